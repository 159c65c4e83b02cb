"""Refused or missing bucket credentials as a user error: one message for every command that reads or writes a
bucket (`pipeline.shard --out`, `pipeline.verify`, `trainer.sample --ckpt`, `trainer.export --publish`,
`trainer.evaluate --ref`, training data sources).

The client libraries report refused credentials as a ~60-line traceback that names neither the bucket nor what
to set. `credentials_guard(url)` turns them into `SystemExit("error: ...")` naming the bucket, the variables to set
and which of them are set now, never their values (the text is scrubbed of every secret in the environment).
It lives in `pipeline` because `pipeline` never imports `trainer`; `trainer.bucket` re-exports these names.

What counts as refused credentials: s3fs turns 403 (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch,
ExpiredToken) into PermissionError; botocore raises NoCredentialsError / ProfileNotFound itself (matched by class
name: the client libraries are optional). A PermissionError on a local path is not a bucket's and passes through.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["FSSPEC_SCHEMES", "is_bucket", "is_credentials_error", "credentials_message", "credentials_guard",
           "SECRET_VARS", "CREDENTIAL_HELP"]

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


def _scrub(text: str) -> str:
    import fsspec

    secrets = [os.environ.get(n) for n in SECRET_VARS]
    secrets += [v for k, v in fsspec.config.conf.get("s3", {}).items() if k in ("secret", "token") and v]
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(str(s), "***")
    return text
