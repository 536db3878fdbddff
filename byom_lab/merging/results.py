"""Result objects shared by methods that store per-task extras next to one merged model."""


class TaskExtras:
    """Base of merging results: per-task parameter and byte accounting over `num_tasks` tasks."""

    num_tasks: int

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

