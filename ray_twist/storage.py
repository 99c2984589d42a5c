"""URIs to pyarrow filesystems: local paths, file://, s3://, gs:// behave the same.

S3-compatible endpoints (MinIO, moto) are reached through `AWS_ENDPOINT_URL` or an
`?endpoint_override=` query on the URI, exactly as pyarrow itself understands them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or plain local path."""
    text = str(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    if text.startswith("s3://") and "endpoint_override" not in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            bucket_and_key = text[len("s3://") :]
            scheme = "http" if endpoint.startswith("http://") else "https"
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint.split("://", 1)[-1],
                scheme=scheme,
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            )
            return fs, bucket_and_key.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def absolute(uri: str | Path) -> str:
    """A local path made absolute (Ray tasks, actors and train workers run in other working
    directories than the driver); URIs (s3://, gs://, file://…) unchanged."""
    text = str(uri)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def absolute_or_none(uri: str | None) -> str | None:
    """`absolute`, passing None through (optional paths of configs)."""
    return None if uri is None else absolute(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching its scheme or query."""
    base, _, query = str(uri).partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Local: write a temp file then rename over. Object stores: a PUT is already atomic."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    else:
        write_bytes(uri, data)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` holding `data` unless it exists: True if this call created it.

    The commit primitive of a pool: of concurrent callers at most one gets True, and no
    reader sees a partial file. Local: a temp file hard-linked to the name (`link` fails if
    the name exists). s3://: a PUT with `If-None-Match: *` (boto3; AWS S3, MinIO and moto
    honour it). Other stores (gs://) offer no conditional create through pyarrow: there an
    existence check precedes the PUT, which is not exclusive against a concurrent caller.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True
    if str(uri).startswith("s3://"):
        return _s3_put_if_absent(str(uri), data)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    write_bytes(uri, data)
    return True


def _s3_put_if_absent(uri: str, data: bytes) -> bool:
    """PutObject with If-None-Match: *, reaching the endpoint `resolve` reaches (the URI's
    `endpoint_override`/`scheme`/`region`/keys query, else AWS_ENDPOINT_URL[_S3] and the
    AWS default credential chain, as boto3 reads them)."""
    import boto3.session
    from botocore.exceptions import ClientError

    location, _, query = uri[len("s3://") :].partition("?")
    bucket, _, key = location.partition("/")
    params = dict(urllib.parse.parse_qsl(query))
    endpoint = params.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{params.get('scheme', 'https')}://{endpoint}"
    client = boto3.session.Session().client(  # a session per call: thread-safe
        "s3",
        endpoint_url=endpoint,
        region_name=params.get("region") or os.environ.get("AWS_DEFAULT_REGION"),
        aws_access_key_id=params.get("access_key"),
        aws_secret_access_key=params.get("secret_key"),
    )
    for attempt in range(3):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "PreconditionFailed":
                return False
            if code != "ConditionalRequestConflict":  # 409: a concurrent create is under way
                raise OSError(f"{uri}: conditional PUT failed: {exc}") from exc
            time.sleep(0.2 * (attempt + 1))
    return False  # still contended: report a conflict rather than guess


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to a URI (used for adapter dirs)."""
    fs, path = resolve(uri)
    pafs.copy_files(str(Path(local_dir).absolute()), path, destination_filesystem=fs)


def download_dir(uri: str | Path, local_dir: str | Path) -> None:
    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).absolute()), source_filesystem=fs)


@contextlib.contextmanager
def local_dir(uri: str | Path) -> Iterator[str]:
    """`with local_dir(uri) as path:` a local path for a directory URI: the directory itself
    when local, else a temporary copy, removed on exit. The one way to read a remote adapter
    or model dir with tools that want a path (PEFT, transformers)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ray-twist-") as tmp:
        download_dir(uri, tmp)
        yield tmp


@contextlib.contextmanager
def staged_dir(uri: str, last: str) -> Iterator[Path]:
    """`with staged_dir(uri, last) as d:` fill the local directory `d`; on a clean exit its
    files land in `uri` so that `last` (the record whose presence marks the directory
    complete) exists only once every other file is whole: the old `last` is deleted first,
    each file is replaced atomically (local: renamed from a sibling staging dir on the same
    filesystem; object stores: one PUT each), `last` goes in after them. A killed writer
    leaves no `last`, so readers that check it (e.g. to resume) never take a half-written
    directory for a finished one; other files already in `uri` are left alone. Local: a
    stale staging dir of a killed writer is cleared. One writer per `uri` at a time."""
    fs, path = resolve(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    with contextlib.ExitStack() as stack:
        if local:
            stage = Path(path).with_name(f".{Path(path).name}.staging")
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            stack.callback(shutil.rmtree, stage, True)
        else:
            stage = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ray-twist-")))
        yield stage
        files = sorted(f for f in stage.iterdir() if f.is_file() and f.name != last)
        if fs.get_file_info(f"{path}/{last}").type != pafs.FileType.NotFound:
            fs.delete_file(f"{path}/{last}")
        for f in [*files, stage / last]:
            if local:
                Path(path).mkdir(parents=True, exist_ok=True)
                os.replace(f, Path(path) / f.name)
            else:
                write_bytes(join(uri, f.name), f.read_bytes())
