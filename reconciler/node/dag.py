"""DAG: a plan's actions, each as soon as its dependencies in the plan are done, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from reconciler.core.plan import Action

Result = TypeVar("Result")


async def run_as_dag(
    actions: Sequence[Action], run_one: Callable[[Action, set[str]], Awaitable[Result]],
    succeeded: Callable[[Result], bool], *, limit: int,
    superseded: Callable[[], bool] | None = None, first: set[str] | None = None,
) -> dict[str, Result]:
    """Run each action once the actions of its dependencies among `actions` are done, at
    most `limit` at once; `run_one(action, failed)` gets the apps whose action did not
    succeed so far (a dependent decides what that means for it). Once `superseded()` no
    further action starts and neither do their dependents; running ones finish. Actions of
    the apps in `first` get the first free slots. Returns the results of the actions that
    ran, by app. Cancelled, it leaves nothing running."""
    failed: set[str] = set()
    slots = asyncio.Semaphore(limit)
    tasks: dict[str, asyncio.Task[Result | None]] = {}
    generation_of = {a.app: a.generation for a in actions}

    async def run(action: Action) -> Result | None:
        for dep in action.depends_on:
            task = tasks.get(dep)
            # an earlier generation only: apps on a cycle (never in a valid tree) share one
            if task is not None and generation_of[dep] < action.generation:
                done = await task
                if done is None:  # never started: neither does its dependent
                    return None
        async with slots:
            if superseded is not None and superseded():
                return None
            result = await run_one(action, failed)
        if not succeeded(result):
            failed.add(action.app)
        return result

    order = list(actions)
    if first:
        order.sort(key=lambda a: a.app not in first)  # stable: plan order otherwise
    for action in order:
        tasks[action.app] = asyncio.create_task(run(action), name=f"do-{action.app}")
    try:
        done = await asyncio.gather(*tasks.values())
    finally:
        for task in tasks.values():  # a cancelled reconcile leaves nothing running
            task.cancel()
    return {app: result for app, result in zip(tasks, done, strict=True) if result is not None}
