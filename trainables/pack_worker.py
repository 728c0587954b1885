"""Where packed trials train: one PackWorker actor per pack, found (or started) through one PackManager per sweep.

Every packed trial stays a Tune trial: a light actor (`trainables.member.train_member`) that asks its worker for
each of its epochs and reports it, so Tune's schedulers and searchers see ordinary trials (ASHA stops one member,
the rest go on; a searcher's new trial joins a pack with room). The worker holds each member as an ordinary
`Trial` and trains, each round, every member that is waiting for an epoch, as one vectorised model
(`trainables.packed`).

Ownership keeps clean-up simple: the driver owns the manager, the manager owns the workers, so a sweep that ends
or dies takes its workers with it. Workers take no CPU or GPU of their own from Ray: the members' actors hold the
pack's share (each asks for 1/K of a trial's resources), and a worker runs where its members run, on their GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainables.data import Dataset, to_device
from trainables.packed import pack_key, packed_epoch
from trainables.train import Report, Trial, load_checkpoint, pick_device, resolve_settings, training_split

GATHER_S = 5.0  # how long a round waits for a member that trained in the last one (then goes on without it)


def _cuda_index(gpu_id: str) -> int:
    """The torch device index of Ray's GPU `gpu_id` in a process that asked Ray for no GPU: it sees the node's
    GPUs as the node was started (Ray 2.60 does not narrow CUDA_VISIBLE_DEVICES for it)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible.index(str(gpu_id)) if str(gpu_id) in visible else int(gpu_id)


@ray.remote(num_cpus=0)
class PackManager:
    """The sweep's directory of pack workers: for each pack key, node and device, the workers there and how many
    members each holds. Created by the driver before Tune starts (so it dies with the driver)."""

    def __init__(self, dataset: list, *, base: dict[str, dict[str, Any]], capacity: int, threads: int):
        self.dataset = dataset[0]  # an ObjectRef, kept in a list so that Ray does not resolve it here
        self.base, self.capacity, self.threads = base, capacity, threads
        self.places: dict[tuple, list] = {}  # (key, node, device) -> [[worker, member ids], ...]
        self.where: dict[str, list] = {}  # member id -> its [worker, member ids] entry

    def assign(self, trial_id: str, config: dict[str, Any], node_id: str, gpu_ids: list) -> tuple[Any, str]:
        """The worker `trial_id` trains on (one with room on its node and device, or a new one), and its device."""
        self.release(trial_id)
        settings = resolve_settings(self.base, config)
        device = pick_device(settings["train"]["device"], gpu_ids, cuda_available=bool(gpu_ids))
        device = f"cuda:{_cuda_index(gpu_ids[0])}" if device.type == "cuda" else "cpu"
        entries = self.places.setdefault((pack_key(settings), node_id, device), [])
        entry = next((e for e in entries if len(e[1]) < self.capacity), None)
        if entry is None:
            worker = PackWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                                        ).remote(self.dataset, base=self.base, device=device, threads=self.threads)
            entry = [worker, set()]
            entries.append(entry)
        entry[1].add(trial_id)
        self.where[trial_id] = entry
        return entry[0], device

    def release(self, trial_id: str) -> None:
        entry = self.where.pop(trial_id, None)
        if entry is not None:
            entry[1].discard(trial_id)


@ray.remote(num_cpus=0, max_concurrency=1000)
class PackWorker:
    """Trains its members together. A member calls `train` once per epoch and gets that epoch's report back; a
    round starts once every member that trained in the last round is waiting again (or after GATHER_S), and
    trains all who wait, whatever their epoch. Torch runs in one thread beside the event loop, so members can
    join, leave and queue up while a round trains."""

    def __init__(self, dataset: Dataset, *, base: dict[str, dict[str, Any]], device: str, threads: int):
        self.dataset, self.base, self.device = dataset, base, torch.device(device)
        self.members: dict[str, Trial] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.expected: set[str] = set()  # members the next round waits for
        self.arrived: asyncio.Event | None = None
        self.runner: asyncio.Task | None = None
        self.torch = ThreadPoolExecutor(max_workers=1)
        self.torch.submit(torch.set_num_threads, threads)  # the CPUs the members hold between them (in that thread)

    async def join(self, trial_id: str, config: dict[str, Any], checkpoint: tune.Checkpoint | None) -> None:
        """Take `trial_id` on as a member (again, when it was retried or PBT gave it another's checkpoint)."""
        loop = asyncio.get_running_loop()
        self.members[trial_id] = await loop.run_in_executor(self.torch, self._build, config, checkpoint, trial_id)
        self.expected.add(trial_id)

    def _build(self, config: dict[str, Any], checkpoint: tune.Checkpoint | None, trial_id: str) -> Trial:
        settings = resolve_settings(self.base, config)
        if not isinstance(self.dataset.train_y, torch.Tensor):  # the first member: the data onto the device, once
            x, y = training_split(self.dataset, settings["data"], self.base["data"]["train_subset"])
            arrays = dict(train_x=x, train_y=y, val_x=self.dataset.val_x, val_y=self.dataset.val_y,
                          test_x=self.dataset.test_x, test_y=self.dataset.test_y)
            self.dataset = dataclasses.replace(self.dataset, **{k: None if v is None else to_device(v, self.device)
                                                                for k, v in arrays.items()})
        # Every member of this worker shares its pack key, so that subset is every member's (training_split gives
        # it back as it is).
        return Trial(settings, self.dataset, self.device, loaded_subset=self.base["data"]["train_subset"],
                     trial_id=trial_id, state=load_checkpoint(checkpoint, self.device))

    async def leave(self, trial_id: str) -> None:
        self.members.pop(trial_id, None)
        self.expected.discard(trial_id)
        future = self.waiting.pop(trial_id, None)
        if future is not None:
            future.cancel()
        self._wake()

    async def train(self, trial_id: str) -> tuple[dict[str, Any], bytes | None, bool]:
        """Train `trial_id`'s next epoch (in the next round); returns its report: metrics, checkpoint file bytes
        (or None), and whether it was its last."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[trial_id] = future
        self.expected.add(trial_id)
        if self.runner is None:
            self.arrived = asyncio.Event()
            self.runner = asyncio.create_task(self._rounds())
        self._wake()
        return await future

    def _wake(self) -> None:
        if self.arrived is not None:
            self.arrived.set()

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            deadline = loop.time() + GATHER_S
            while self.waiting and not self.expected <= self.waiting.keys():
                try:
                    await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:  # a member that vanished without leaving (its actor was killed)
                    self.expected &= self.waiting.keys()  # is not waited for again until it asks again
                    break
                self.arrived.clear()
            batch, self.waiting = self.waiting, {}
            if not batch:
                continue
            try:
                reports = await loop.run_in_executor(self.torch, self._round, list(batch))
            except Exception as error:  # every member of the round fails with it (Tune retries them)
                for future in batch.values():
                    future.set_exception(error)
                continue
            for trial_id, future in batch.items():
                if reports[trial_id] is None:  # an epoch between its reports: straight on to the next round
                    self.waiting[trial_id] = future
                else:
                    future.set_result(reports[trial_id])
                    if reports[trial_id][2]:
                        self.expected.discard(trial_id)
            self._wake()

    def _round(self, trial_ids: list[str]) -> dict[str, tuple[dict[str, Any], bytes | None, bool] | None]:
        """One epoch of every member in `trial_ids`, together; each one's report, or None between reports."""
        trials = [self.members[tid] for tid in trial_ids]
        lrs = [t.lr for t in trials]
        t0 = time.perf_counter()
        stats = packed_epoch(trials)
        epoch_time = time.perf_counter() - t0
        reports = {}
        for tid, trial, lr, (loss, acc, seen) in zip(trial_ids, trials, lrs, stats):
            result = trial.end_epoch(loss, acc, seen, epoch_time, lr)
            reports[tid] = None if result is None else (result.metrics, _bytes(result), result.done)
        return reports


def _bytes(result: Report) -> bytes | None:
    """The checkpoint file a report carries, as bytes for the member to write."""
    if result.save is None:
        return None
    buffer = io.BytesIO()
    result.save(buffer)
    return buffer.getvalue()
