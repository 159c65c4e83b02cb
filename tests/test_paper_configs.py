"""configs/paper/ (and configs/*.yaml): every experiment of the paper loads, dry-runs on 8 GPUs with the batch
arithmetic global = micro x accumulation x 8, and has the settings, DeepSpeed clipping and compute that
configs/paper/README.md states; every command in that README parses with the real CLIs (the training ones
dry-run)."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from helpers import jpeg_shard_set
from trainer.finetune import main as finetune_main
from trainer.pretrain import main as pretrain_main
from trainer.train.config import ExperimentConfig, parse_overrides

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "configs" / "paper" / "README.md").read_text()
WORLD = 8
CLIP = {"zero2_fp16.json": "at norm 1.0", "zero2_fp16_noclip.json": "off (gradient_clipping 0)"}


def table(first_header: str) -> list[dict]:
    """The README's markdown table whose header row starts with `first_header`, as {column: cell} rows."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    header, rows = split(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, split(line))))
    return rows


def config_cell(cell: str) -> tuple[str, list[str]]:
    """"`file.yaml` `--set a=1 --set b=2`" -> (file name, ["a=1", "b=2"])."""
    quoted = re.findall(r"`([^`]+)`", cell)
    words = " ".join(quoted[1:]).split()
    assert all(w == "--set" for w in words[0::2]), cell
    return quoted[0], words[1::2]


SETTINGS = table("experiment")
OURS = table("config")
COST = {row["experiment"]: row for row in table("experiment | config | paper")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 one-sample shards (more than the 8 x 4 readers): the dry run reads only the manifest."""
    return jpeg_shard_set(tmp_path_factory.mktemp("paper"), identities=4, per_identity=10, size=24, crop=16,
                          shard_size=1)


def dry(capsys, argv: list[str], trainer: str, shards, run_dir, world: int = WORLD) -> str:
    extra = ["--init", str(run_dir / "none")] if trainer == "finetune" and "--init" not in argv else []
    (finetune_main if trainer == "finetune" else pretrain_main)(
        extra + argv + ["--run-dir", str(run_dir), "--dry-run", "--world-size", str(world),
                        "--set", f"data.sources=[{shards}]"])
    return capsys.readouterr().out


def check_arithmetic(out: str, cfg: ExperimentConfig, world: int = WORLD) -> None:
    m = re.search(r"world size (\d+) x micro batch (\d+) x gradient accumulation (\d+) = global batch (\d+)", out)
    assert m, out
    w, micro, acc, total = map(int, m.groups())
    assert (w, micro, total) == (world, cfg.train.micro_batch, cfg.train.global_batch)
    assert micro * acc * w == total
    assert f"{cfg.train.steps} steps = {cfg.train.steps * cfg.train.global_batch:,} images" in out


def check_cells(row: dict, cfg: ExperimentConfig) -> None:
    """The README's settings cells against the resolved config."""
    t, o, m = cfg.train, cfg.optim, cfg.mask
    assert row["steps"] == f"{t.steps // 1000}k" and t.steps % 1000 == 0
    assert row["batch / micro"] == f"{t.global_batch} / {t.micro_batch}"
    assert float(row["lr"]) == o.lr
    kind, *rest = row["mask"].split()
    if kind == "none":
        assert m.rate == 0
    else:
        assert (m.kind, m.rate) == (kind, float(rest[-1])) and m.rate > 0
        if kind == "block":
            assert m.block == int(rest[0])
    dwt = cfg.model.input == "dwt"
    assert row["tokens"] == (cfg.model.dwt_tokens if dwt else "-")
    assert row["loss"] == (cfg.loss.dwt_weighting if dwt else "-") and (dwt or cfg.loss.dwt_weighting == "uniform")
    assert row["decay"] == o.decay
    assert row["EMA decay / every / after"] == f"{t.ema_decay:g} / {t.ema_every} / {t.ema_update_after}"
    assert t.ema_warmup
    assert row["flip"] == ("yes" if cfg.data.flip else "no")


def ds_name(row: dict) -> str:
    return row["ds_configs/"].strip("`")


@pytest.mark.parametrize("row", SETTINGS, ids=[r["experiment"] for r in SETTINGS])
def test_paper_experiment_settings_and_dry_run(row, shards, tmp_path, capsys):
    name, sets = config_cell(row["config and overrides"])
    path = REPO / "configs" / "paper" / name
    cfg = ExperimentConfig.from_yaml(path, parse_overrides(sets))
    check_cells(row, cfg)
    ds = ds_name(row)
    assert ds in path.read_text(), f"{name}: its header should name the DeepSpeed config it runs with ({ds})"
    # the reference's settings common to every paper run
    assert cfg.optim.betas == (0.99, 0.99) and cfg.optim.weight_decay == 0.03 and cfg.optim.warmup_steps == 0
    assert cfg.optim.decay == "all" and cfg.train.ema_update_after == 100

    argv = ["--config", str(path), "--deepspeed_config", str(REPO / "ds_configs" / ds)]
    out = dry(capsys, argv + [a for s in sets for a in ("--set", s)], row["trainer"], shards, tmp_path)
    check_arithmetic(out, cfg)
    assert f"gradient clipping {CLIP[ds]}" in out

    cost = COST[row["experiment"]]  # the cost table: the dry run's compute section, as printed
    assert cost["config"] == row["config and overrides"]
    seen, tokens = cost["tokens seen"].split(" / ")
    assert f"{seen} of {tokens} tokens" in out
    gflop = re.search(r"forward ([\d,.]+) GFLOP per image", out).group(1).replace(",", "")
    assert gflop == cost["GFLOP / image"].replace(",", "")
    pflop, days = re.search(r"images = ([\d,]+) PFLOP = ([\d,.]+) GPU-days at 16.2 TFLOP/s", out).groups()
    assert (pflop, days) == (cost["PFLOP"], cost["V100-days at the paper's rate"])
    if cost["ours"] != "-":  # our default config for the same experiment, at the same rate
        ours_days, ours_file = re.fullmatch(r"([\d.]+) \(`(.+)`\)", cost["ours"]).groups()
        ours = dry(capsys, ["--config", str(REPO / "configs" / ours_file),
                            "--deepspeed_config", str(REPO / "ds_configs" / "zero2_fp16.json")],
                   "pretrain", shards, tmp_path)
        assert re.search(rf"PFLOP = {re.escape(ours_days)} GPU-days", ours), ours


def test_every_experiment_has_a_cost_row_and_the_anchor_is_the_measurement():
    assert set(COST) == {r["experiment"] for r in SETTINGS}
    # the 16.2 TFLOP/s rate comes from the DDPM baseline: 120 h on 8 V100 = 40 V100-days
    assert abs(float(COST["DDPM baseline (L)"]["V100-days at the paper's rate"]) - 120 * 8 / 24) < 0.2


def test_key_factor_masks_match_the_reference_counts():
    """Masked patches of 256 per run, as the reference's generators produce them (its configs/ablation/msm)."""
    from trainer.core.masking import num_visible

    reference = {("patch", 0.1, 4): 25, ("patch", 0.5, 4): 128, ("patch", 0.9, 4): 230,
                 ("block", 0.1, 2): 24, ("block", 0.5, 2): 128, ("block", 0.9, 2): 228,
                 ("block", 0.1, 4): 16, ("block", 0.5, 4): 128, ("block", 0.9, 4): 224, ("block", 0.5, 8): 128,
                 ("crop", 0.1, 4): 31, ("crop", 0.5, 4): 135, ("crop", 0.9, 4): 231,
                 # 70%: no reference file; its generators' int(0.7 * 256) // b^2 blocks of b^2 patches
                 ("patch", 0.7, 4): 179, ("block", 0.7, 2): 176, ("block", 0.7, 4): 176}
    for (kind, rate, block), masked in reference.items():
        assert 256 - num_visible(kind, 16, rate, block) == masked, (kind, rate, block)
    runs = [row for row in SETTINGS if row["experiment"].startswith("key factors")]
    assert len(runs) == 16
    for row in runs:
        cfg = ExperimentConfig.from_yaml(REPO / "configs" / "paper" / "celeba64_msm_S.yaml",
                                         parse_overrides(config_cell(row["config and overrides"])[1]))
        assert num_visible(cfg.mask.kind, 16, cfg.mask.rate, cfg.mask.block) < 256  # every run masks something


def test_the_dwt_split_model_is_the_papers_size():
    from trainer.train.dryrun import compute

    cfg = ExperimentConfig.from_yaml(REPO / "configs" / "paper" / "celebahq256_L_dwt_pretrain.yaml")
    c = compute(cfg)
    assert c["params"] == 233_399_488 and (c["seen"], c["tokens"]) == (616, 2048)  # 308 visible per token set


@pytest.mark.parametrize("row", OURS, ids=[r["config"] for r in OURS])
def test_our_defaults_table_and_dry_run(row, shards, tmp_path, capsys):
    path = REPO / "configs" / row["config"].strip("`").removeprefix("../")
    cfg = ExperimentConfig.from_yaml(path)
    check_cells(row, cfg)
    ds = ds_name(row)
    out = dry(capsys, ["--config", str(path), "--deepspeed_config", str(REPO / "ds_configs" / ds)], row["trainer"],
              shards, tmp_path)
    check_arithmetic(out, cfg)
    assert f"gradient clipping {CLIP[ds]}" in out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_top_level_configs_dry_run(path, shards, tmp_path, capsys):
    """Every shipped config divides on 8 GPUs, except the quickstart (planned for 1 or 2)."""
    cfg = ExperimentConfig.from_yaml(path)
    world = 2 if path.name == "quickstart.yaml" else WORLD
    out = dry(capsys, ["--config", str(path), "--deepspeed_config", str(REPO / "ds_configs" / "zero2_fp16.json")],
              "pretrain", shards, tmp_path, world)
    check_arithmetic(out, cfg, world)


# --- the README's commands ---------------------------------------------------------------------------------------

def commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


TRAINING = [c for c in commands() if re.search(r"trainer/(pretrain|finetune)\.py", c) and "$" not in c]
MODULES = [c for c in commands() if re.search(r"-m (trainer\.(evaluate|sample|export)|pipeline\.shard)\b", c)]


def test_the_readme_has_every_command():
    assert len(TRAINING) == 16 and len(MODULES) == 13
    configs = {Path(shlex.split(c)[shlex.split(c).index("--config") + 1]).name for c in TRAINING}
    assert configs == {p.name for p in (REPO / "configs" / "paper").glob("*.yaml")} - {"celeba64_msm_S.yaml"}
    assert any("celeba64_msm_S.yaml" in c for c in commands())  # the key-factor loop


@pytest.mark.parametrize("command", TRAINING, ids=lambda c: c.split("--run-dir ")[1].split()[0])
def test_readme_training_command_dry_runs(command, shards, tmp_path, capsys):
    words = shlex.split(command)
    script = next(w for w in words if w.startswith("trainer/"))
    argv = words[words.index(script) + 1:]
    i = argv.index("--run-dir")
    del argv[i:i + 2]
    assert words[:3] == ["deepspeed", "--num_gpus", "8"], command
    cfg = ExperimentConfig.from_yaml(REPO / argv[argv.index("--config") + 1],
                                     parse_overrides([argv[j + 1] for j, w in enumerate(argv) if w == "--set"]))
    argv = [str(REPO / a) if a.startswith(("configs/", "ds_configs/")) else a for a in argv]
    out = dry(capsys, argv, "finetune" if script.endswith("finetune.py") else "pretrain", shards, tmp_path)
    check_arithmetic(out, cfg)


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("command", MODULES, ids=lambda c: c.split(" -m ")[1][:90])
def test_readme_tool_command_parses(command, monkeypatch):
    """The flags of every sharding, export, sampling and evaluation command, parsed by the real CLI (nothing runs)."""
    import pipeline.shard
    import trainer.evaluate
    import trainer.export
    import trainer.sample

    words = shlex.split(command)
    i = words.index("-m")
    module, argv = words[i + 1], words[i + 2:]
    mains = {"pipeline.shard": pipeline.shard.main, "trainer.evaluate": trainer.evaluate.main,
             "trainer.export": trainer.export.main, "trainer.sample": trainer.sample.main}
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad flag exits here (SystemExit 2)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        mains[module](argv)
