"""Scenarios of the rehearsal tests (tests/rehearsal/), each run in a fresh process (a rehearsal owns the default
process group and installs process-wide patches): ``python -m tests.helpers.rehearsal <name>`` prints one JSON line
of results; ``run(name)`` is what the tests call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


def run(name: str, *args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "tests.helpers.rehearsal", name, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise AssertionError(f"scenario {name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-6000:]}")
    return json.loads(lines[-1])


def _line_of(fn, text: str) -> int:
    """The line number of the first line of ``fn``'s source that contains ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _error(fn) -> dict:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the scenario reports which error it was
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def counts(rows) -> Counter:
    """Occurrences of the report's collectives or host synchronisations by (op or kind, group or site, phase)."""
    c = Counter()
    for row in rows:
        c[(row["op"] if "op" in row else row["kind"], row.get("group", row.get("site")), row["phase"])] += row["count"]
    return c


def assert_replay_matches_computed(replay: dict, computed: dict, hidden_state: int, per_chunk: int = 2) -> None:
    """Micro-batch replay's report against the one computing every micro-batch (k2-tiny on PP2 with virtual stages):
    the same peaks within replay's known excess (k2_megatron/rehearsal/replay.py: up to ``per_chunk`` hidden states per
    model chunk, two), the same collectives and host synchronisations."""
    excess = 2 * per_chunk * hidden_state
    assert computed["peak_total"] <= replay["peak_total"] <= computed["peak_total"] * 1.005 + excess
    for category, value in computed["category_max"].items():
        assert value - 64 * 1024 <= replay["category_max"][category] <= value * 1.005 + excess, category
    assert counts(replay["collectives"]) == counts(computed["collectives"])
    assert counts(replay["syncs"]) == counts(computed["syncs"])


# ----- scenarios -----

def fake_cuda_patches() -> dict:
    """enable() / disable(): what torch.cuda answers inside, that a fake CUDA backward runs, that everything is
    restored after, and the refusals."""
    import torch
    import torch.distributed as dist

    from k2_megatron.megatron import cpu_compat
    from k2_megatron.rehearsal import fake_cuda

    names = ("is_available", "device_count", "current_device", "get_device_properties", "synchronize", "Stream")
    before = {n: getattr(torch.cuda, n) for n in names}
    before_tensor, before_new_group = torch.tensor, dist.new_group
    out = {"available before": torch.cuda.is_available()}
    with fake_cuda.fake_cuda(fake_cuda.H100, local_rank=3):
        out["inside"] = {"available": torch.cuda.is_available(), "count": torch.cuda.device_count(),
                         "current": torch.cuda.current_device(), "name": torch.cuda.get_device_name(),
                         "capability": list(torch.cuda.get_device_capability()),
                         "memory": torch.cuda.get_device_properties().total_memory}
        with fake_cuda.FakeCudaTensorMode(allow_non_fake_inputs=True):
            w = torch.empty(4, 2, device="cuda", requires_grad=True)
            x = torch.empty(8, 4, device="cuda")
            loss = torch.mm(x, w)[1:3].square().sum()
            with torch.autograd.set_multithreading_enabled(False):
                loss.backward()
            out["backward"] = {"grad shape": list(w.grad.shape), "grad device": str(w.grad.device),
                               "indexed": list(x[2:5, None].shape)}
        out["refuses while cpu_compat"] = "not checked"
    out["restored"] = all(getattr(torch.cuda, n) is before[n] for n in names) and torch.tensor is before_tensor \
        and dist.new_group is before_new_group
    out["available after"] = torch.cuda.is_available()
    cpu_compat.enable()
    out["refuses while cpu_compat"] = _error(lambda: fake_cuda.enable())
    cpu_compat.disable()
    return out


def collectives() -> dict:
    """NCCL's device rule and size rules on every collective kind, what is recorded, gloo groups."""
    import torch
    import torch.distributed as dist

    from k2_megatron.rehearsal.session import rehearsal

    out = {}
    with rehearsal(world_size=8, rank=3) as r:
        group = dist.new_group([2, 3], group_desc="TEST_PAIR_GROUP")
        gloo = dist.new_group([2, 3], backend="gloo", group_desc="TEST_GLOO_GROUP")
        host = torch.ones(4)
        dev = torch.ones(4, device="cuda")
        cases = {
            "all_reduce": lambda t: dist.all_reduce(t, group=group),
            "all_gather_into_tensor": lambda t: dist.all_gather_into_tensor(torch.empty(8, device=t.device), t,
                                                                            group=group),
            "reduce_scatter_tensor": lambda t: dist.reduce_scatter_tensor(torch.empty(2, device=t.device), t,
                                                                          group=group),
            "all_to_all_single": lambda t: dist.all_to_all_single(torch.empty(4, device=t.device), t, [1, 3], [2, 2],
                                                                  group=group),
            "broadcast": lambda t: dist.broadcast(t, group_src=0, group=group),
            "send": lambda t: dist.send(t, group_dst=0, group=group),
            "recv": lambda t: dist.recv(t, group_src=0, group=group),
        }
        for name, call in cases.items():
            out[f"host {name}"] = _error(lambda: call(host))
            out[f"device {name}"] = _error(lambda: call(dev))
        out["issuing lines"] = {name: _line_of(collectives, f'"{name}": lambda') for name in cases}
        out["host all_reduce on gloo"] = _error(lambda: dist.all_reduce(host, group=gloo))
        out["wrong all_gather size"] = _error(
            lambda: dist.all_gather_into_tensor(torch.empty(6, device="cuda"), dev, group=group))
        out["wrong all_to_all splits"] = _error(
            lambda: dist.all_to_all_single(torch.empty(4, device="cuda"), dev, [1, 2], [2, 2], group=group))
        out["records"] = [{"op": c.op, "group": c.group, "group_size": c.group_size, "bytes": c.bytes, "dtype": c.dtype,
                           "device": c.device} for c in r.collectives.records]
    return out


def host_syncs() -> dict:
    """Value reads, device-to-host copies and data-dependent shapes on fake CUDA tensors, with their locations;
    the values the code sees; host tensors stay real."""
    import torch

    from k2_megatron.rehearsal.session import RehearsalError, rehearsal

    with rehearsal(world_size=1, rank=0) as r:
        with r.phase("optimizer step"):
            x = torch.ones(3, device="cuda")
            item = x.sum().item()
            flag = bool((x > 0).all())
            listed = x.tolist()
            copied = x.cpu()
            shape_error = _error(lambda: x[x > 0])
            host = torch.arange(4)
            host_value = host.sum().item()
        lines = {"item": _line_of(host_syncs, "item = x.sum().item()"),
                 "cpu": _line_of(host_syncs, "copied = x.cpu()")}
        events = [{"kind": e.kind, "line": e.site.issuer.line, "file": e.site.issuer.file, "count": e.count,
                   "allowed": e.allowed.name if e.allowed else None} for e in r.syncs.events]
        unexpected = len(r.syncs.unexpected())
    return {"item": item, "flag": flag, "listed": listed, "copied device": str(copied.device),
            "shape error": shape_error, "host value": host_value, "lines": lines, "events": events,
            "unexpected": unexpected, "rehearsal error": RehearsalError.__name__}


def memory() -> dict:
    """Live fake device bytes by category, the peak's breakdown, frees, and torch.cuda's answers."""
    import torch

    from k2_megatron.rehearsal.session import rehearsal

    with rehearsal(world_size=1, rank=0) as r:
        with r.phase("model", "parameters"):
            weight = torch.empty(1024, 256, dtype=torch.bfloat16, device="cuda")  # 512 KiB
            grad = torch.zeros(1024, 256, device="cuda")  # 1 MiB, parameters until assigned
        r.memory.assign([grad], "gradient buffers")
        r.memory.begin_step()
        with r.phase("forward-backward", "activations"):
            act = torch.empty(2048, 256, device="cuda")  # 2 MiB
            view = act[:10]  # no new bytes
            host = torch.empty(10**6)  # host memory: not counted
            temp = torch.empty(4096, 256, device="cuda")  # 4 MiB, freed at once
            del temp
            at_peak = dict(r.memory.peak.by_category)
        allocated = torch.cuda.memory_allocated()
        del act, view, host
        after_free = r.memory.total
        with r.phase("forward-backward", "activations"):  # megatron frees buffers with untyped_storage().resize_(0)
            buffer = torch.empty(1024, 256, device="cuda")  # 1 MiB
            buffer.untyped_storage().resize_(0)
            after_resize = r.memory.total
            buffer.untyped_storage().resize_(512 * 1024)  # and re-allocates them (offloading): 512 KiB
            after_regrow = r.memory.total
            del buffer
    return {"at_peak": at_peak, "peak": r.memory.peak.total, "category_max": r.memory.category_max,
            "allocated": allocated, "after_free": after_free, "weight": weight.numel() * 2,
            "after_resize": after_resize, "after_regrow": after_regrow, "after_all": r.memory.total}


def harness() -> dict:
    """The harness scenarios above, one rehearsal session after the other in this one process (one start-up)."""
    return {"fake_cuda_patches": fake_cuda_patches(), "collectives": collectives(), "host_syncs": host_syncs(),
            "memory": memory()}


def step(config: str, world_size: str, rank: str, *overrides: str) -> dict:
    """rehearse_step of a config for one rank, with and without micro-batch replay (``REPLAY=both``) or one way."""
    from k2_megatron.rehearsal.step import rehearse_step
    from k2_megatron.config import load_config

    results = {}
    for replay in ((True, False) if os.environ.get("REPLAY") == "both" else (True,)):
        cfg = load_config(None if config == "-" else config, list(overrides))
        report = rehearse_step(cfg, world_size=int(world_size), rank=int(rank), replay=replay)
        results["replay" if replay else "computed"] = report.to_dict()
    return results


def offload_step(world_size: str, rank: str, *overrides: str) -> dict:
    """``step`` with megatron's activation offloading of every tensor (min_offloaded_tensor_size=0: k2-tiny's are
    below megatron's default of 2**20 elements), plus what megatron's offload manager reports offloaded in its
    warm-up step (the first micro-batches, up to the first backward)."""
    from megatron.core.pipeline_parallel.fine_grained_activation_offload import PipelineOffloadManager

    from k2_megatron.megatron import activation_memory
    from k2_megatron.rehearsal.replay import MicroBatchReplay

    original = activation_memory.transformer_config_overrides

    def every_tensor(options):
        out = original(options)
        if options.cpu_offload:
            out["min_offloaded_tensor_size"] = 0
        return out

    activation_memory.transformer_config_overrides = every_tensor
    summaries = []

    def summary(self):  # what post_warmup_callback computes (once per manager), kept before the rehearsal drops it
        warmup = getattr(self, "_is_warmup", False)
        out = reset(self)
        if warmup and not self._is_warmup:
            summaries.append(dict(self.offload_summary_bytes))
        return out

    reset = PipelineOffloadManager.reset
    PipelineOffloadManager.reset = summary
    records = []

    def remove(self):  # micro-batch replay's records: what each chunk's recorded forward kept, device and host
        records.append([{"kept": sum(r.kept.values()), "pinned_kept": r.pinned_kept}
                        for r in self.records if r is not None])
        return remove_replay(self)

    remove_replay = MicroBatchReplay.remove
    MicroBatchReplay.remove = remove
    results = step("-", world_size, rank, *overrides)
    results["megatron_offloaded"] = summaries  # one per rehearsal: replay first with REPLAY=both
    results["records"] = records[0] if records else []
    return results


def moe_item() -> dict:
    """An .item() inserted into the MoE experts' forward is reported with its location."""
    from k2_megatron.megatron import moe
    from k2_megatron.rehearsal.step import rehearse_step
    from k2_megatron.config import load_config

    original = moe.K2GroupedMLP.forward

    def forward_with_item(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        permuted_probs.sum().item()  # the inserted host synchronisation
        return original(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    moe.K2GroupedMLP.forward = forward_with_item
    report = rehearse_step(load_config(None, []), world_size=1, rank=0)
    return {"unexpected": report.unexpected_syncs,
            "line": _line_of(forward_with_item, "permuted_probs.sum().item()")}


def layer_activations(*overrides: str) -> dict:
    """Per decoder layer: the device bytes its forward allocated that are still alive when the micro-batch's forward
    is done (what backward will free), k2-mini with 2 layers (dense + MoE) on one rehearsed GPU, one micro-batch of
    256 tokens; beside it the planner's activation_bytes_per_token of that layer times the tokens."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from k2_megatron.config import load_config
    from k2_megatron.rehearsal.session import rehearsal
    from k2_megatron.rehearsal.step import RehearsedTrainer
    from k2_megatron.training.plan import activation_bytes_per_token

    seq = 256
    cfg = load_config("examples/configs/k2_mini_1gpu.yaml", [
        "model.overrides.num_hidden_layers=2", f"data.seq_length={seq}", "train.micro_batch_size=1",
        f"train.global_batch_tokens={seq}", *overrides])
    watched, measured = {}, {}
    with rehearsal(1, 0) as r:
        trainer = RehearsedTrainer(cfg, r, replay=False)
        trainer.setup()
        mem = r.memory
        model = trainer.chunks[0]
        layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
        for m in layers:
            m.register_forward_pre_hook(lambda m, args: watched.__setitem__(m.layer_number, mem.watch()))
            m.register_forward_hook(lambda m, args, out: mem.unwatch())
        model.register_forward_hook(lambda m, args, out: measured.update(
            {n: mem.live_bytes(w) for n, w in watched.items()}))
        with r.phase("forward-backward", "activations"):
            trainer.forward_backward([trainer.data.next_batch(trainer.batch_fields)])
        trainer.close()
    k2 = cfg.k2_config(None)
    planned = {m.layer_number: activation_bytes_per_token(k2, m.layer_number - 1, cfg.memory.options()) * seq
               for m in layers}
    return {"measured": measured, "planned": planned}


def pretrain_step(world_size: str, rank: str, *overrides: str) -> dict:
    """The pretraining loop itself (k2_megatron.training.pretrain.pretrain) under the rehearsal, one step."""
    from k2_megatron.rehearsal.session import rehearsal
    from k2_megatron.config import load_config
    from k2_megatron.training.pretrain import pretrain

    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, ["train.iters=1", f"output.dir={out}", "checkpoint.save_at_end=false",
                                 "output.plot=false", "output.tensorboard=false", "output.progress_bar=false",
                                 "train.eval_interval=0", *overrides])
        with rehearsal(int(world_size), int(rank)) as r:
            error = _error(lambda: pretrain(cfg))
    return {"error": error, "collectives": r.collectives.summary()}


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    result = globals()[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(result, default=str))
