"""Where a job may write: under the coordinator's output roots (default `<data_dir>/jobs`), into a directory
it creates or finds empty, so a job never writes over, loads or deletes what it did not make.

`resolve` runs at submission (a path outside the roots is a 422 naming `output_dir`); `claim` runs when the
job starts (the coordinator's runner): it creates the directory and leaves `.asyncopd-job` (the job id) in
it, the mark the learner's export checks (`owner`) before it replaces `<output_dir>/student`. A directory
that filled up while the job waited in the queue (another job wrote there) fails the job at start.
"""

from __future__ import annotations

from pathlib import Path

OWNER_FILE = ".asyncopd-job"


class OutputDirError(ValueError):
    """The job's `output_dir` is not a place this job may write; the message says why and what is allowed."""


def default_roots(data_dir: Path) -> list[Path]:
    return [data_dir / "jobs"]


def resolve(output_dir: str | None, job_id: str, roots: list[Path]) -> Path:
    """The absolute, symlink-free directory the job writes to; OutputDirError unless it lies strictly under
    one of `roots` and is new or empty. A relative `output_dir` is taken under the first root."""
    path = confine(output_dir, job_id, roots)
    check_empty(path)
    return path


def confine(output_dir: str | None, job_id: str, roots: list[Path]) -> Path:
    """`output_dir` resolved (symlinks followed, `..` collapsed); OutputDirError unless strictly under a root."""
    real_roots = [root.absolute().resolve() for root in roots]
    if output_dir is None:
        path = real_roots[0] / job_id
    else:
        if "\x00" in output_dir:
            raise OutputDirError("output_dir contains a NUL character")
        path = (real_roots[0] / output_dir).resolve()  # an absolute output_dir replaces the root
    allowed = " or ".join(str(r) for r in real_roots)
    if not any(path != root and path.is_relative_to(root) for root in real_roots):
        raise OutputDirError(f"output_dir {output_dir} is outside the output roots: it must be a directory under "
                             f"{allowed} (the coordinator's ASYNCOPD_OUTPUT_ROOTS)")
    return path


def check_empty(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise OutputDirError(f"output_dir {path} already holds files: a job writes only into a new or empty "
                             "directory, so it never replaces or resumes from files it did not create")


def claim(path: Path, job_id: str) -> None:
    """Create the job's output directory (or take an empty one) and mark it as this job's."""
    if (path / OWNER_FILE).is_file() and (path / OWNER_FILE).read_text().strip() == job_id:
        return  # claimed before (a coordinator restarted while starting this job)
    check_empty(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER_FILE).write_text(job_id + "\n")


def owner(path: Path) -> str | None:
    """The job that claimed `path`, if any."""
    try:
        return (path / OWNER_FILE).read_text().strip()
    except OSError:
        return None
