"""Refused or missing bucket credentials as a user error: one message for every command that reads or writes a
bucket (`pipeline.shard --out`, `pipeline.verify`, `trainer.sample --ckpt`, `trainer.export --publish`,
`trainer.evaluate --ref`, training data sources).

The client libraries report refused credentials as a ~60-line traceback that names neither the bucket nor what
to set. `credentials_guard(url)` turns them into `SystemExit("error: ...")` naming the bucket, the variables to set
and which of them are set now, never their values (the text is scrubbed of every secret in the environment).
It lives in `pipeline` because `pipeline` never imports `trainer`; `trainer.bucket` re-exports these names.

Credentials never travel in a URL (`s3://KEY:SECRET@bucket/...`, `https://user:pass@host/...`): s3fs does not read
them there (it would take `KEY:SECRET@bucket` for the bucket's name), and every URL a command is given is printed
and saved with the run (config.yaml, checkpoints, the safetensors metadata, the model card). `credentials_in_url`
is the one check, applied where a URL enters (the experiment config's data.sources, `pipeline.store.Store`, the
weight loaders, export/publish): the URL is refused with a message that shows it without them and says what to
set instead. `without_credentials` removes the user-info of every URL in a text (messages are scrubbed with it).

What counts as refused credentials: s3fs turns 403 (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch,
ExpiredToken) into PermissionError; botocore raises NoCredentialsError / ProfileNotFound itself (matched by class
name: the client libraries are optional). A PermissionError on a local path is not a bucket's and passes through.
"""
from __future__ import annotations

import contextlib
import os
import re

__all__ = ["FSSPEC_SCHEMES", "is_bucket", "is_credentials_error", "credentials_message", "credentials_guard",
           "credentials_in_url", "refuse_url_credentials", "without_credentials", "SECRET_VARS", "CREDENTIAL_HELP"]

FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
# Secrets that must never reach a message (an error text is scrubbed of their values before it is raised).
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN",
               "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")
CREDENTIAL_HELP = {  # per protocol family: what to set, and the variables whose presence (never value) is reported
    "s3": ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or "
           "AWS_PROFILE (a profile in ~/.aws/credentials); for an S3-compatible store also its endpoint, "
           "FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL (fsspec-only keys: FSSPEC_S3_KEY / FSSPEC_S3_SECRET)",
           ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
            "FSSPEC_S3_ENDPOINT_URL", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET")),
    "gs": ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run `gcloud auth "
           "application-default login` (fsspec-only: FSSPEC_GCS_TOKEN)", ("GOOGLE_APPLICATION_CREDENTIALS",)),
    "az": ("set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING, "
           "AZURE_STORAGE_SAS_TOKEN)", ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                                        "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")),
}
_FAMILY = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError",
                      "UnauthorizedSSOTokenError", "TokenRetrievalError", "DefaultCredentialsError", "RefreshError",
                      "ClientAuthenticationError"}  # botocore, google-auth, azure-core (matched by name: optional)


def is_bucket(url: str) -> bool:
    return url.split("://", 1)[0] in FSSPEC_SCHEMES if "://" in url else False


def is_credentials_error(e: BaseException) -> bool:
    """Refused or missing credentials (see the module docstring)."""
    return isinstance(e, PermissionError) or any(k.__name__ in _CREDENTIAL_ERRORS for k in type(e).__mro__)


def credentials_message(url: str, e: BaseException) -> str:
    """A user error for refused credentials: the bucket, what to set, which variables are set (never values)."""
    url = without_credentials(url)
    protocol, _, rest = url.partition("://")
    what, names = CREDENTIAL_HELP.get(_FAMILY.get(protocol, ""), ("check the store's credentials", ()))
    state = ", ".join(f"{n} {'set' if os.environ.get(n) else 'unset'}" for n in names)
    msg = (f"{url}: access to bucket {rest.split('/', 1)[0]!r} was refused ({type(e).__name__}: {e}): wrong or "
           f"missing credentials, or no permission. To fix, {what}." + (f" Now: {state}." if state else ""))
    return _scrub(msg)


@contextlib.contextmanager
def credentials_guard(url: str):
    """Inside it, refused credentials while working on bucket `url` end the command (SystemExit, no traceback)
    with `credentials_message`. Other errors, and any error for a local path, pass through unchanged."""
    try:
        yield
    except Exception as e:
        if is_bucket(str(url)) and is_credentials_error(e):
            raise SystemExit(f"error: {credentials_message(str(url), e)}") from None
        raise


# --- credentials inside URLs -------------------------------------------------------------------------------------

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S+)")
_HOST_PORT = re.compile(r"[^:@]*:\d*")


def _userinfo_end(rest: str) -> int:
    """Length of the user-info (through its last "@") at the start of `rest`, the text after "scheme://"; 0 when
    there is none. The authority ends at the first "/", but a raw secret may hold "/" (AWS secret keys often do), so
    a first segment with a ":" that is no host:port also marks one; the last "@" ends it (removing too much from a
    path that holds "@" is harmless, leaving part of a secret is not)."""
    first = rest.split("/", 1)[0]
    if "@" not in rest or not ("@" in first or (":" in first and not _HOST_PORT.fullmatch(first))):
        return 0
    return rest.rindex("@") + 1


def without_credentials(text: str) -> str:
    """`text` with the user-info (USER:SECRET@) of every URL in it removed."""
    return _URL.sub(lambda m: m[1] + m[2][_userinfo_end(m[2]):], text)


def credentials_in_url(url: str, where: str) -> str | None:
    """The user error for a URL that holds credentials, naming `where` (a flag or config key) and the URL without
    them; None for any other URL or path."""
    if without_credentials(str(url)) == str(url):
        return None
    protocol = str(url).split("://", 1)[0]
    what = CREDENTIAL_HELP.get(_FAMILY.get(protocol, ""), ("pass them the way the store's client documents",))[0]
    return (f"{where} {without_credentials(str(url))}: remove the credentials (USER:SECRET@) from the URL: they would "
            f"be printed and saved with the run (config.yaml, checkpoints, model card); instead, {what}")


def refuse_url_credentials(url: str, where: str) -> None:
    """SystemExit("error: ...") when `url` holds credentials (see `credentials_in_url`)."""
    msg = credentials_in_url(url, where)
    if msg:
        raise SystemExit(f"error: {msg}")


def _scrub(text: str) -> str:
    import fsspec

    text = without_credentials(text)

    secrets = [os.environ.get(n) for n in SECRET_VARS]
    secrets += [v for k, v in fsspec.config.conf.get("s3", {}).items() if k in ("secret", "token") and v]
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(str(s), "***")
    return text
