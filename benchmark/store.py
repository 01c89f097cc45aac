"""The MLflow tracking store as a place: reachable, writable, and created once under a lock."""
from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from benchmark.errors import UserError, one_line
from benchmark.locks import hold_file_lock

# MLflow's own defaults retry an unreachable server for about four minutes per call; a run
# should fail within a minute or so instead.  A user's own settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",  # waits of about 0, 2, 4, 8 s
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_TIMEOUT_S = 5.0  # the one quick question asked of a server before any work
LOCK_WAIT_S = 120.0  # creating a store's tables takes seconds; minutes means something is stuck
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
STORE_HINT = ("run from a writable folder or set MLFLOW_TRACKING_URI to a writable store, "
              "e.g. sqlite:////tmp/mlflow.db")


def bound_http_retries() -> None:
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


def prepare(uri: str, write: bool = True) -> None:
    """Make sure the store at ``uri`` answers and takes writes, creating a SQLite store's
    tables if needed (under a lock, so processes starting together cannot collide), and that
    the folder where new experiments keep artifacts can be written.  With ``write=False``, only
    that an existing store can be read.  ``UserError`` otherwise."""
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    local = sqlite_path(uri) if scheme == "sqlite" else \
        _local_path(uri) if scheme in ("", "file") else None
    if not write and local is not None:
        if not local.exists():
            raise UserError(f"no tracking store at {local}; run from the folder that holds "
                            f"it or set MLFLOW_TRACKING_URI")
        if not os.access(local, os.R_OK):
            raise UserError(f"cannot read the tracking store {local}: no permission")
    elif scheme == "sqlite" and local is not None:
        _prepare_sqlite(local, uri)
    elif scheme in ("", "file"):
        check_writable_folder(local, "the tracking store", STORE_HINT)
    elif scheme in ("http", "https"):
        _probe_server(uri)
        return  # the server keeps the store and (when it serves them) the artifacts
    elif scheme in DATABASE_PORTS:
        _probe_port(uri, scheme)
    store = _open(uri)
    root = getattr(store, "artifact_root_uri", None)
    if write and root:
        check_artifact_location(root, "new experiments",
                                "run from a writable folder (the default is ./mlruns)")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working folder unless it
    starts with a fourth slash); ``None`` for an in-memory database."""
    rest = uri[len("sqlite://"):].split("?")[0]
    path = unquote(rest[1:]) if rest.startswith("/") else ""
    return None if path in ("", ":memory:") else Path(path).absolute()


def is_local(location: str) -> bool:
    return urlparse(location).scheme in ("", "file") or os.path.isabs(location)


def check_artifact_location(location: str, owner: str, hint: str) -> None:
    """``UserError`` when a local artifact folder can neither be written nor created; remote
    locations (s3://, mlflow-artifacts:/, ...) are left to their own service."""
    if is_local(location):
        check_writable_folder(_local_path(location), f"the artifacts of {owner}", hint)


def check_writable_folder(folder: Path, what: str, hint: str) -> None:
    """``UserError`` unless ``folder`` is a writable folder or could be created as one; it is
    not created here (a check must leave nothing behind)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" in {folder}"
        raise UserError(f"cannot write {what}{where}: {existing} is a file, not a folder; "
                        f"{hint}")
    where = folder if existing == folder else f"{folder} (below {existing})"
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _on_read_only_fs(existing) else "no permission"
        raise UserError(f"cannot write {what} in {where}: {why}; {hint}")


def _on_read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False


def _local_path(location: str) -> Path:
    parsed = urlparse(location)
    return Path(unquote(parsed.path) if parsed.scheme == "file" else location).absolute()


# SQLite ---------------------------------------------------------------------------------------
def _prepare_sqlite(path: Path, uri: str) -> None:
    check_writable_folder(path.parent, f"the tracking store {path.name}", STORE_HINT)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder of tracking store {path}: "
                        f"{err.strerror}") from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise UserError(f"tracking store {path} is read-only; make it writable or set "
                        f"MLFLOW_TRACKING_URI to another store")
    with _file_lock(path.with_name(path.name + ".lock")), _quiet("mlflow.store.db.utils", "alembic"):
        _open(uri)  # creates the tables of a new store (MLflow's migrations, in one process)
    _check_sqlite_takes_writes(path)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """MLflow's INFO lines about creating tables would precede a user's one-line error."""
    import logging

    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """The store's creation lock, held for the block (none where fcntl is missing)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # Windows: no lock; concurrent first starts remain a risk there
        yield
        return
    lock = hold_file_lock(lock_path, LOCK_WAIT_S, "preparing the tracking store; if none is "
                                                  "running, delete the lock file")
    try:
        yield
    finally:
        lock.release()


def _check_sqlite_takes_writes(path: Path) -> None:
    """Take SQLite's write lock and let it go: catches a read-only file or file system that
    the permission bits do not show (and waits out another process's write, like MLflow)."""
    try:
        connection = sqlite3.connect(path, timeout=30)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as err:
        raise UserError(f"tracking store {path} does not take writes: {one_line(err)}") from None


# Servers --------------------------------------------------------------------------------------
def _probe_server(uri: str) -> None:
    """One request to the server's tracking API, without retries, so that a wrong address,
    a server that is down or refused credentials show in seconds."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search",
                                "POST", max_retries=0, backoff_factor=0, backoff_jitter=0,
                                timeout=PROBE_TIMEOUT_S, raise_on_status=False,
                                json={"max_results": 1})
    except Exception as err:  # noqa: BLE001  (MLflow wraps every transport error)
        raise UserError(f"MLflow tracking server {uri} does not answer ({_why(err)}); start it "
                        f"or fix MLFLOW_TRACKING_URI") from None
    if response.status_code in (401, 403):
        raise UserError(f"MLflow tracking server {uri} refuses access (HTTP "
                        f"{response.status_code}); set MLFLOW_TRACKING_USERNAME and "
                        f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if response.status_code == 404:
        raise UserError(f"{uri} answers but has no MLflow tracking API (HTTP 404); is "
                        f"MLFLOW_TRACKING_URI the address of an MLflow server?")
    if response.status_code != 200:
        raise UserError(f"MLflow tracking server {uri} answers HTTP {response.status_code} "
                        f"({response.reason})")


def _why(err: BaseException) -> str:
    """The root cause of a failed request, in a few words."""
    import requests

    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for cause in chain:
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
            return "connection refused"
        if isinstance(cause, socket.gaierror) or "resolve" in str(cause).lower():
            return "host name not found"
        if isinstance(cause, (requests.exceptions.Timeout, TimeoutError)) or \
                "timed out" in str(cause):
            return f"no answer within {PROBE_TIMEOUT_S:g} s"
        if isinstance(cause, requests.exceptions.SSLError):
            return "TLS error"
    return one_line(chain[-1])


def _probe_port(uri: str, scheme: str) -> None:
    parsed = urlparse(uri)
    host, port = parsed.hostname or "localhost", parsed.port or DATABASE_PORTS[scheme]
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except socket.gaierror:
        raise UserError(f"tracking database host '{host}' not found "
                        f"(MLFLOW_TRACKING_URI)") from None
    except OSError as err:
        why = (f"no answer within {PROBE_TIMEOUT_S:g} s" if isinstance(err, TimeoutError)
               else (err.strerror or type(err).__name__).lower())
        raise UserError(f"tracking database {host}:{port} does not answer ({why}); start it or "
                        f"fix MLFLOW_TRACKING_URI") from None


def _open(uri: str):
    """MLflow's store object for ``uri`` (cached by MLflow, so later calls reuse it)."""
    from mlflow.tracking._tracking_service.utils import _get_store

    try:
        return _get_store(uri)
    except Exception as err:  # noqa: BLE001  (MLflow raises many kinds; all mean unusable)
        message = one_line(err)
        if "out-of-date database schema" in message:
            raise UserError(f"tracking store {uri} was made by an older MLflow: upgrade it with "
                            f"`mlflow db upgrade {uri}` (back it up first)") from None
        raise UserError(f"cannot open the tracking store {uri}: {message}") from None
