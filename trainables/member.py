"""Packed trials (`resources.pack` K > 1): each trial stays a Tune trial, a light actor that reports, while a
pack worker trains its members' epochs, those that share a pack key as one vectorised model (`trainables.packed`).

- `train_member` is the Tune trainable: it finds its pack's worker through the sweep's PackManager, joins it with
  its config and checkpoint, then asks for one epoch at a time and reports each as an unpacked trial would (the
  same metrics, its own checkpoint). So Tune's schedulers, searchers, retries and `sweep resume` treat it as any
  trial: ASHA stops one member and the rest go on; a searcher's new trial joins a pack with room.
- `PackManager` knows the workers: for each node and device, the workers there and their members. The driver owns
  it and it owns the workers, so a sweep that ends or dies takes them with it.
- `PackWorker` trains up to K members, those that share a pack key as one model. It takes no CPU or GPU from Ray:
  the members' actors hold the pack's share (each asks for 1/K of a trial's resources), and it runs on their node,
  on their GPU.

Nothing here imports torch at module level: wherever a handle to one of these actors arrives (every member), Ray
imports this module, and torch would cost each member seconds and hundreds of MB. The worker imports it in its own
process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainables.reporting import report
from trainables.settings import device_type, resolve_settings

# Settings each member has for itself; every other setting must match for trials to share a pack.
MEMBER_SETTINGS = {"train.seed", "train.epochs", "train.report_every", "train.checkpoint_every", "optim.lr",
                   "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas", "optim.eps",
                   "optim.alpha", "optim.l2_penalty", "optim.schedule", "optim.milestones", "optim.gamma",
                   "optim.step_size"}
# Epochs a member may train ahead of what it reported: enough that Tune's driver, which takes the results of a
# whole pack at once, does not hold the next round up; a member that Tune stops has trained that many for nothing.
AHEAD = 2
# glibc hands freed blocks above a threshold back to the OS at once, and a pack's activations and optimizer
# temporaries are K times a trial's, megabytes each: every step would fault fresh pages in (a round of 4 MLPs took
# 0.55 s instead of 0.37 s here). Workers keep what they free for the next step.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def pack_key(settings: dict[str, dict[str, Any]]) -> str:
    """What trials must share to train in one pack: every setting but the members' own (MEMBER_SETTINGS)."""
    shared = {section: {k: v for k, v in values.items() if f"{section}.{k}" not in MEMBER_SETTINGS}
              for section, values in settings.items()}
    return json.dumps(shared, sort_keys=True, default=str)


def train_member(config: dict[str, Any], *, manager) -> None:
    """Ray Tune function trainable: train `config` in a pack, reporting as `trainables.train.train_trial` does."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a "Checkpoint successfully created" per epoch
    trial_id = tune.get_context().get_trial_id()
    node = ray.get_runtime_context().get_node_id()
    worker, device = ray.get(manager.assign.remote(trial_id, config, node, ray.get_gpu_ids()))
    try:
        done, last_report = ray.get(worker.join.remote(trial_id, config, tune.get_checkpoint(), device))
        if last_report:  # restored from its last checkpoint (trainables.train.Trial.last_report)
            report(last_report, None, config["arm"]["name"])
        while not done:
            metrics, checkpoint, done = ray.get(worker.train.remote(trial_id))
            report(metrics, (lambda path: Path(path).write_bytes(checkpoint)) if checkpoint else None,
                   config["arm"]["name"])
    finally:  # also when Tune stops this trial (ASHA, a pause): its report raises in here
        worker.leave.remote(trial_id)
        manager.release.remote(trial_id)


def _cuda_index(gpu_id: str) -> int:
    """The torch device index of Ray's GPU `gpu_id` in a process that asked Ray for no GPU: it sees the node's
    GPUs as the node was started (Ray 2.60 does not narrow CUDA_VISIBLE_DEVICES for it)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible.index(str(gpu_id)) if str(gpu_id) in visible else int(gpu_id)


@ray.remote(num_cpus=0)
class PackManager:
    """The sweep's directory of pack workers: on each node and device, the workers there and their members (member
    id -> pack key). A member goes where its pack grows, else to an idle worker, else to a new one; on CPUs, a new
    one only while the node has fewer workers than the packs its CPUs hold: past that, a worker with room takes
    the member as a pack of its own, instead of a process that starts (torch, the data: seconds) and then shares
    the cores with the others. On a GPU each pack key keeps a worker of its own: another process launches kernels
    beside the others (these small models are launch-bound) and its start holds none of them up.

    Workers for the first packs start with the manager, on the driver's node (`prestart`: the sweep's packs, at most
    as many as fit there), so that importing torch overlaps Tune starting the members instead of following it."""

    def __init__(self, dataset: list, *, base: dict[str, dict[str, Any]], capacity: int, threads: int,
                 trial_cpu: float, trial_gpu: float, node_id: str | None = None, prestart: int = 0):
        self.dataset = dataset[0]  # an ObjectRef, kept in a list so that Ray does not resolve it here
        self.base, self.capacity, self.threads = base, capacity, threads
        self.trial_cpu, self.trial_gpu = trial_cpu, trial_gpu  # a whole pack's resources: one trial's
        self.places: dict[tuple, list[dict]] = {}  # (node, device) -> [{"worker", "members": {id: key}}, ...]
        self.where: dict[str, dict] = {}  # member id -> its worker's entry
        self.spares: dict[str, list] = {}  # node -> workers started ahead, on no device yet
        if node_id is not None and prestart:
            fit = self._cpu_packs(node_id) if not trial_gpu else \
                self._node_resources(node_id).get("GPU", 0) * math.floor(1 / trial_gpu)  # 0 on a head without any
            fit = fit if math.isfinite(fit) else 1  # trials that ask for nothing: Ray does not say how many fit
            self.spares[node_id] = [self._start_worker(node_id) for _ in range(int(min(prestart, fit)))]

    def assign(self, trial_id: str, config: dict[str, Any], node_id: str, gpu_ids: list):
        """The worker `trial_id` trains on, and its device (see the class docstring)."""
        self.release(trial_id)
        settings = resolve_settings(self.base, config)
        device = device_type(settings["train"]["device"], gpu_ids, cuda_available=bool(gpu_ids))
        device = f"cuda:{_cuda_index(gpu_ids[0])}" if device == "cuda" else "cpu"
        key, entries = pack_key(settings), self.places.setdefault((node_id, device), [])
        with_room = [e for e in entries if len(e["members"]) < self.capacity]
        entry = next((e for e in with_room if key in e["members"].values()), None) or \
            next((e for e in entries if not e["members"]), None)
        if entry is None and device == "cpu" and with_room and len(entries) >= max(1, self._cpu_packs(node_id)):
            entry = min(with_room, key=lambda e: len(e["members"]))
        if entry is None:
            spares = self.spares.get(node_id)
            entry = {"worker": spares.pop() if spares else self._start_worker(node_id), "members": {}}
            entries.append(entry)
        entry["members"][trial_id] = key
        self.where[trial_id] = entry
        return entry["worker"], device

    def _start_worker(self, node_id: str):
        return PackWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                                  runtime_env={"env_vars": KEEP_FREED_MEMORY}
                                  ).remote(self.dataset, base=self.base, threads=self.threads)

    @staticmethod
    def _node_resources(node_id: str) -> dict[str, float]:
        return next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})

    def _cpu_packs(self, node_id: str) -> float:
        """Whole packs (one trial's CPUs each) that the node's CPUs hold."""
        cpus = self._node_resources(node_id).get("CPU", 0)
        return math.floor(cpus / self.trial_cpu) if self.trial_cpu else math.inf

    def release(self, trial_id: str) -> None:
        entry = self.where.pop(trial_id, None)
        if entry is not None:
            entry["members"].pop(trial_id, None)


@ray.remote(num_cpus=0, max_concurrency=1000)
class PackWorker:
    """Trains its members a round (one epoch of each) at a time, whatever epoch each is at: those that share a pack
    key as one model, one pack after another.

    A member calls `train` once per epoch and gets that epoch's report. The worker does not wait for it to ask: as
    soon as a round is over it trains the next, so members report to Tune while their next epoch trains, up to
    AHEAD epochs ahead (a member that Tune stops, or PBT gives another's state, leaves, and those epochs are dropped
    with it). A round waits a little (a quarter of the last round) for members still collecting, so that packs
    stay whole. Torch runs in one thread beside the event loop, so members can join, collect and leave meanwhile."""

    def __init__(self, dataset, *, base: dict[str, dict[str, Any]], threads: int):
        import torch  # in the worker's own process (see the module docstring)

        from trainables import packed

        self.packed, self.source, self.base = packed, dataset, base
        self.on_device: dict = {}  # the members' training split on their device (trainables.packed.member_trial)
        self.members: dict[str, Any] = {}  # member id -> its trainables.train.Trial
        self.keys: dict[str, str] = {}  # member id -> its pack key
        self.reports: dict[str, deque] = {}  # trained, not yet collected (at most AHEAD each)
        self.waiting: dict[str, asyncio.Future] = {}  # members that asked before their next report was ready
        self.failed: dict[str, Exception] = {}  # members whose pack's round raised, for their next `train`
        self.done: set[str] = set()  # members whose last report is trained
        self.expected: set[str] = set()  # members a round waits for (not those that vanished without leaving)
        self.changed: asyncio.Event | None = None
        self.round_s = 0.0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pool.submit(torch.set_num_threads, threads)  # the CPUs the members hold between them (in that thread)

    async def join(self, trial_id: str, config: dict[str, Any], checkpoint: tune.Checkpoint | None,
                   device: str) -> tuple[bool, dict[str, Any] | None]:
        """Take `trial_id` on as a member (again, when it was retried or PBT gave it another's checkpoint), on
        `device` (the manager's choice: every member of a worker has the same). Returns whether it had already
        finished (restored from its last checkpoint: nothing to train) and its last report."""
        trial = await asyncio.get_running_loop().run_in_executor(
            self.pool, self.packed.member_trial, self.source, self.on_device, self.base, config, checkpoint,
            device, trial_id)
        self._forget(trial_id)
        if trial.finished:
            return True, trial.last_report
        self.members[trial_id], self.keys[trial_id] = trial, pack_key(resolve_settings(self.base, config))
        self.expected.add(trial_id)
        if self.changed is None:
            self.changed = asyncio.Event()
            asyncio.create_task(self._rounds())
        self.changed.set()
        return False, None

    async def leave(self, trial_id: str) -> None:
        self._forget(trial_id)
        if self.changed is not None:
            self.changed.set()

    def _forget(self, trial_id: str) -> None:
        self.members.pop(trial_id, None)
        self.keys.pop(trial_id, None)
        self.failed.pop(trial_id, None)
        self.reports[trial_id] = deque()
        self.done.discard(trial_id)
        self.expected.discard(trial_id)
        future = self.waiting.pop(trial_id, None)
        if future is not None:
            future.cancel()

    async def train(self, trial_id: str) -> tuple[dict[str, Any], bytes | None, bool]:
        """`trial_id`'s next report: its metrics, its checkpoint file's bytes (or None), and whether it was its last."""
        if trial_id in self.failed:
            raise self.failed.pop(trial_id)
        self.expected.add(trial_id)
        self.changed.set()
        if self.reports[trial_id]:
            return self.reports[trial_id].popleft()
        future = asyncio.get_running_loop().create_future()
        self.waiting[trial_id] = future
        return await future

    def _ready(self) -> list[str]:
        """Members that can train in the next round: not finished, fewer than AHEAD reports not yet collected."""
        return [tid for tid in self.members if tid not in self.done and len(self.reports[tid]) < AHEAD]

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.changed.wait()
            self.changed.clear()
            if not self._ready():
                continue
            deadline = loop.time() + max(0.05, self.round_s / 4)
            while not self.expected <= {*self._ready(), *self.done}:
                try:
                    await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:  # on without the stragglers; one that vanished is not waited for again
                    self.expected &= {*self._ready(), *self.done}
                    break
                self.changed.clear()
            packs: dict[str, dict[str, Any]] = {}
            for tid in self._ready():
                packs.setdefault(self.keys[tid], {})[tid] = self.members[tid]
            start = loop.time()
            for pack in packs.values():
                batch = {tid: trial for tid, trial in pack.items() if self.members.get(tid) is trial}  # still here
                if not batch:  # (the packs before it trained while members came and went)
                    continue
                try:
                    reports = await loop.run_in_executor(self.pool, self.packed.train_round, batch)
                except Exception as error:  # every member of the pack fails with it (Tune retries them)
                    for tid, trial in batch.items():
                        if self.members.get(tid) is not trial:  # it left or joined again meanwhile
                            continue
                        future = self.waiting.pop(tid, None)
                        self._forget(tid)
                        if future is not None and not future.done():
                            future.set_exception(error)
                        else:  # at its next `train`
                            self.failed[tid] = error
                    continue
                self._deliver(batch, reports)
            self.round_s = loop.time() - start
            self.changed.set()

    def _deliver(self, batch: dict[str, Any], reports: dict[str, tuple | None]) -> None:
        """Each member's report to it if it is waiting, else into its queue."""
        for tid, result in reports.items():
            if self.members.get(tid) is not batch[tid] or result is None:  # it left or joined again meanwhile;
                continue  # or it trained an epoch between its reports
            if result[2]:
                self.done.add(tid)
            future = self.waiting.pop(tid, None)
            if future is not None and not future.done():
                future.set_result(result)
            else:
                self.reports[tid].append(result)
