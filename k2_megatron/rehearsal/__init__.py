"""Rehearse a GPU cluster on a CPU: rank R of a world of N runs its real code path with fake CUDA tensors and a fake
process group that obeys NCCL's rules, and reports its peak device memory by category, the collectives of a step and
every host synchronisation.

- fake_cuda: the one module that patches torch.cuda / torch.distributed / megatron-core for it (+ a C++ stand-in for
  the CUDA runtime's device guard), gated on tested releases
- session: ``rehearsal(world_size, rank)``, the context in which a rank runs; RehearsalMode sees every operator
- collectives: NCCL's device rule (NCCLRuleError) and the record of collectives
- host_sync: host synchronisations and ALLOWED_SYNCS, the one list of those a step may make
- memory: live fake device storage by category (parameters, gradient buffers, optimizer state, ...)
- routing: the MoE routing the rehearsal declares (balanced, or skewed onto the rank's experts)
- step: one optimizer step of a pretraining config driven through megatron-core; checkpoint: the dry save
- report: the per-rank report (memory next to the dry-run planner, collectives, host synchronisations)

Run each rehearsal in its own process: it initialises the default process group and installs patches.
"""
