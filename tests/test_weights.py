"""trainer.weights.load: pre-trained weights from safetensors (local and bucket) and from DeepSpeed runs' EMA."""
import pytest
import torch
from safetensors.torch import save_file

from trainer.core.models import build_model
from trainer.weights.load import apply_pretrained, is_training_run, load_pretrained


def test_safetensors_round_trip_and_key_report(tmp_path):
    torch.manual_seed(0)
    src = build_model("tiny", 3, 16)
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    save_file(state, str(path))
    dst = build_model("tiny", 3, 16)
    missing, unexpected = apply_pretrained(dst, load_pretrained(str(path)))
    assert missing == ["head.bias"] and unexpected == ["extra.weight"]
    assert torch.equal(dst.head.weight, src.head.weight)
    with pytest.raises(SystemExit, match="pos_embed"):
        apply_pretrained(build_model("tiny", 3, 32), load_pretrained(str(path)))  # another resolution
    with pytest.raises(SystemExit, match="no such file"):
        load_pretrained(str(tmp_path / "nope.safetensors"))
    with pytest.raises(SystemExit, match="neither"):
        load_pretrained(str(tmp_path))
    # an exported file holds the EMA only: asking it for the online weights names the way out
    with pytest.raises(SystemExit, match="only the EMA weights.*--init-weights ema"):
        load_pretrained(str(path), "online")
    assert not is_training_run(str(path))


def test_safetensors_from_a_bucket(tmp_path, s3_server):
    import fsspec

    torch.manual_seed(1)
    src = build_model("tiny", 3, 16)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fsspec.filesystem("s3", skip_instance_cache=True).put_file(str(tmp_path / "m.safetensors"),
                                                              "test-bucket/models/m.safetensors")
    state = load_pretrained("s3://test-bucket/models/m.safetensors")
    assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())
