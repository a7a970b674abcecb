"""Jobs in SQLite (WAL, synchronous=FULL): a job is committed to disk before its request is answered, and its state
moves pending -> running -> ready | error | cancelled, each step one transaction.

Restart rule (`recover`): a job found `running` was interrupted (the server died under it). Its first interruption
sends it back to `pending`, to run again from the start (its seeds were fixed at submission, so the retry makes the
same images and rewrites the same files); a second one marks it `error`, with the reason, rather than retrying a job
that may be what kills the server."""

import json
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

PENDING, RUNNING, READY, ERROR, CANCELLED = "pending", "running", "ready", "error", "cancelled"
FINISHED = (READY, ERROR, CANCELLED)
MAX_ATTEMPTS = 2  # the first run and one retry after an interruption

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,                -- 'openai' or 'bfl': how results are shown
    owner TEXT NOT NULL DEFAULT '',   -- the API key's id (security.key_id); '' on an open server
    model TEXT NOT NULL,
    spec TEXT NOT NULL,               -- JSON: specs.JobSpec
    batch_key TEXT NOT NULL,          -- jobs with equal keys may share forward passes
    num_images INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_param TEXT,
    results TEXT,                     -- JSON: [{"file", "seed"}, ...] under DATA_DIR/results/<id>/
    idempotency_key TEXT,
    request_hash TEXT,
    base_url TEXT,                    -- where the client reached us: the base of result URLs in webhooks
    webhook_url TEXT,
    webhook_secret TEXT,
    webhook_state TEXT,               -- NULL, 'due', 'delivered' or 'failed'
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs(webhook_state, webhook_next) WHERE webhook_state = 'due';
"""


@dataclass
class Job:
    id: str
    api: str
    model: str
    spec: dict
    batch_key: str
    num_images: int
    owner: str = ""
    state: str = PENDING
    attempts: int = 0
    error: str | None = None
    error_param: str | None = None
    results: list[dict] | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    base_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_state: str | None = None
    webhook_attempts: int = 0
    webhook_next: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


_COLUMNS = [name for name in Job.__dataclass_fields__]
_JSON_COLUMNS = {"spec", "results"}


def _row_to_job(row: sqlite3.Row) -> Job:
    values = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Job(**values)


class JobStore:
    """The job table. One connection shared by the server's threads behind a lock: SQLite serialises writers
    anyway, and every statement here is short."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # each commit fsynced: an answered job survives power loss
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self):
        return _Transaction(self._db, self._lock, self)

    # -- submission ----------------------------------------------------------------------------------------------
    def insert(self, job: Job) -> tuple[Job, bool]:
        """Commit a new job; with an idempotency key already used by this owner, return that job instead
        (created False)."""
        return self.insert_many([job])[0]

    def insert_many(self, jobs: list[Job]) -> list[tuple[Job, bool]]:
        """insert() for several jobs in one transaction: one fsync for all (see GroupCommit)."""
        sql = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})"
        out = []
        with self._transaction() as db:
            for job in jobs:
                if job.idempotency_key is not None:
                    row = db.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                     (job.owner, job.idempotency_key)).fetchone()
                    if row is not None:
                        out.append((_row_to_job(row), False))
                        continue
                values = {name: getattr(job, name) for name in _COLUMNS}
                for name in _JSON_COLUMNS:
                    if values[name] is not None:
                        values[name] = json.dumps(values[name], sort_keys=True)
                db.execute(sql, values)
                out.append((job, True))
        return out

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row_to_job(row)

    def find(self, owner: str, idempotency_key: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                   (owner, idempotency_key)).fetchone()
        return None if row is None else _row_to_job(row)

    def pending(self, limit: int = 1000) -> list[Job]:
        """Pending jobs, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created_at, rowid LIMIT ?",
                                    (PENDING, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def ids(self, state: str) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM jobs WHERE state = ?", (state,))}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*), SUM(num_images) FROM jobs GROUP BY state").fetchall()
        out = {state: 0 for state in (PENDING, RUNNING, READY, ERROR, CANCELLED)}
        out.update({f"{state}_images": 0 for state in (PENDING, RUNNING)})
        for state, count, images in rows:
            out[state] = count
            out[f"{state}_images"] = images or 0
        return out

    # -- the worker's transitions ---------------------------------------------------------------------------------
    def start(self, job_ids: list[str]) -> list[str]:
        """pending -> running (attempts + 1) for those still pending (a cancel may have come first)."""
        started = []
        now = time.time()
        with self._transaction() as db:
            for job_id in job_ids:
                cursor = db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? "
                                    "WHERE id = ? AND state = ?", (RUNNING, now, job_id, PENDING))
                if cursor.rowcount:
                    started.append(job_id)
        return started

    def finish(self, job_id: str, results: list[dict]) -> bool:
        """running -> ready. False when the job is no longer running (cancelled meanwhile): nothing changes."""
        return self.finish_many([(job_id, results)])[0]

    def finish_many(self, finished: list[tuple[str, list[dict]]]) -> list[bool]:
        """finish() for a batch group's jobs, in one transaction."""
        with self._transaction():
            return [self._end(job_id, READY, (RUNNING,), results=json.dumps(results)) for job_id, results in finished]

    def fail(self, job_id: str, message: str, param: str | None = None,
             states: tuple[str, ...] = (PENDING, RUNNING)) -> bool:
        return self._end(job_id, ERROR, states, error=message, error_param=param)

    def cancel(self, job_id: str) -> bool:
        """pending or running -> cancelled (a running job's worker notices between steps)."""
        return self._end(job_id, CANCELLED, (PENDING, RUNNING), error="cancelled by a DELETE request")

    def _end(self, job_id: str, state: str, from_states: tuple[str, ...], **values) -> bool:
        now = time.time()
        sets = "".join(f", {k} = :{k}" for k in values)
        allowed = ", ".join(f":s{i}" for i in range(len(from_states)))
        sql = (f"UPDATE jobs SET state = :state, finished_at = :now{sets}, "
               "webhook_state = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'due' END, webhook_next = :now "
               f"WHERE id = :id AND state IN ({allowed})")
        params = {"state": state, "now": now, "id": job_id, **values,
                  **{f"s{i}": s for i, s in enumerate(from_states)}}
        with self._transaction() as db:
            return db.execute(sql, params).rowcount == 1

    def requeue(self, job_ids: list[str]) -> None:
        """running -> pending without spending an attempt: the server stopped the run itself (a clean shutdown)."""
        with self._transaction() as db:
            for job_id in job_ids:
                db.execute("UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), started_at = NULL "
                           "WHERE id = ? AND state = ?", (PENDING, job_id, RUNNING))

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: interrupted (running) jobs go back to pending once, then to error. Returns (requeued,
        failed) ids."""
        requeued, failed = [], []
        now = time.time()
        with self._transaction() as db:
            for row in db.execute("SELECT id, attempts FROM jobs WHERE state = ?", (RUNNING,)).fetchall():
                if row["attempts"] < MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET state = ?, started_at = NULL WHERE id = ?", (PENDING, row["id"]))
                    requeued.append(row["id"])
                else:
                    db.execute("UPDATE jobs SET state = ?, finished_at = ?, error = ?, webhook_next = ?, "
                               "webhook_state = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'due' END "
                               "WHERE id = ?",
                               (ERROR, now, f"interrupted twice (the server stopped while it ran, {row['attempts']} "
                                "times); not retried again", now, row["id"]))
                    failed.append(row["id"])
        return requeued, failed

    # -- retention ------------------------------------------------------------------------------------------------
    def expired(self, finished_before: float) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? AND "
                                    "(webhook_state IS NULL OR webhook_state != 'due')", (finished_before,)).fetchall()
        return [r["id"] for r in rows]

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # -- webhooks -------------------------------------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int = 16) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE webhook_state = 'due' AND webhook_next <= ? "
                                    "ORDER BY webhook_next LIMIT ?", (now, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def webhook_result(self, job_id: str, state: str, next_try: float | None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET webhook_state = ?, webhook_attempts = webhook_attempts + 1, "
                       "webhook_next = ? WHERE id = ?", (state, next_try, job_id))


class GroupCommit:
    """Inserts from many request threads committed together: each commit fsyncs the WAL (synchronous=FULL, so an
    answered job is on disk), and sixteen clients arriving at once then cost one fsync, not sixteen in a row."""

    def __init__(self, store: JobStore):
        self.store = store
        self._queue: list[tuple[Job, Future]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fluxion-commit", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stop:
                raise RuntimeError("the job store is closing")
            self._queue.append((job, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            try:
                results = self.store.insert_many([job for job, _ in batch])
            except BaseException as e:  # every waiter learns of the failure
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock (rolled back on any error); nested uses join the outer
    transaction."""

    def __init__(self, db: sqlite3.Connection, lock, store):
        self.db, self.lock, self.store = db, lock, store
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.outer = not self.db.in_transaction
        if self.outer:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
        return self.db

    def __exit__(self, kind, value, traceback):
        try:
            if self.outer:
                self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False
