"""Result objects shared by methods that store per-task extras next to one merged model."""
from typing import ClassVar


class TaskExtras:
    """Base of merging results: per-task parameter and byte accounting over `num_tasks` tasks.

    `method` and `hyperparameters` record what produced the result (set by the method, read back by
    `load_result`); `save(dir)` writes it as BYOM files (merging/storage.py). A subclass that names
    its `kind` and defines `stored_shared()`, `stored_task(t)`, `stored_info()` and the class method
    `from_stored(shared, tasks, manifest)` saves and loads with no change to storage.py.
    """

    kind: ClassVar[str | None] = None
    num_tasks: int
    method: str | None = None
    hyperparameters: dict | None = None

    def save(self, directory, tasks=None, overwrite: bool = False, inputs: dict | None = None):
        """Write the result as a BYOM directory: shared model, one small file per task, manifest.

        Args:
            directory: the directory to create (written beside it, then renamed into place).
            tasks: task names, in task order (default task0, task1, ...); each names a file.
            overwrite: replace an existing result directory at `directory`.
            inputs: what went in (formats, files and their sha256, settings), recorded in the manifest.

        Returns:
            The directory as a Path.
        """
        from .storage import save_result  # storage reads every result class

        return save_result(self, directory, tasks=tasks, overwrite=overwrite, inputs=inputs)

    def task_params(self, t: int) -> int:
        """Extra parameters stored for task t (overridden by each result)."""
        raise NotImplementedError

    def task_bytes(self, t: int) -> int:
        """Bytes of the extras stored for task t (overridden by each result)."""
        raise NotImplementedError

    def num_params(self, t: int | None = None) -> int:
        """Extra parameters stored per task, as the paper counts them (task t, or the mean over tasks)."""
        return self._per_task(self.task_params, t)

    def nbytes(self, t: int | None = None) -> int:
        """Bytes of the per-task extras (task t, or the mean over tasks)."""
        return self._per_task(self.task_bytes, t)

    def _per_task(self, count, t: int | None) -> int:
        """count(t), or the rounded mean of count over all tasks."""
        if t is not None:
            self._check_task(t)
            return count(t)
        return round(sum(count(i) for i in range(self.num_tasks)) / self.num_tasks)

    def _check_task(self, t: int) -> None:
        """Raise unless 0 <= t < num_tasks."""
        if not isinstance(t, int) or not 0 <= t < self.num_tasks:
            raise ValueError(f"task index must lie in [0, {self.num_tasks}), got {t!r}")


def recorded(result, method: str, **hyperparameters):
    """`result` with the method and hyperparameters that produced it recorded on it."""
    result.method, result.hyperparameters = method, hyperparameters
    return result
