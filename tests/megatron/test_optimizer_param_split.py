"""Which optimizer updates each parameter of the megatron K2 model, pinned by name: the table below is written out
from the K2 report (section 2: Muon for the hidden matrices of attention and FFN, including every expert and the
shared expert; AdamW for the embedding, the output layer, the norms and the MoE router) and megatron-core's
weight-decay rule (none on 1-D parameters). It does not use ``uses_muon`` (the rule under test), so a wrong
pattern, a renamed megatron module or a parameter added to k2-tiny fails here by name.

Checked on a built k2-tiny (dense layer 0, MoE layers 1-3), through the distributed optimizer k2-pretrain uses
(``get_muonclip_optimizer``) and through the plain ``muon_param_groups``.
"""

import pytest
import torch

pytestmark = pytest.mark.slow  # builds k2-tiny on megatron in-process (~10 s with the imports)

MUON, ADAMW = "muon", "adamw"
# megatron name -> (optimizer, weight decay applied)
MODEL = {
    "embedding.word_embeddings.weight": (ADAMW, True),
    "decoder.final_layernorm.weight": (ADAMW, False),
    "output_layer.weight": (ADAMW, True),
}
ATTENTION = {
    "input_layernorm.weight": (ADAMW, False),
    "self_attention.linear_q_down_proj.weight": (MUON, True),
    "self_attention.q_layernorm.weight": (ADAMW, False),
    "self_attention.linear_q_up_proj.weight": (MUON, True),
    "self_attention.linear_kv_down_proj.weight": (MUON, True),
    "self_attention.kv_layernorm.weight": (ADAMW, False),
    "self_attention.linear_kv_up_proj.weight": (MUON, True),
    "self_attention.linear_proj.weight": (MUON, True),
    "pre_mlp_layernorm.weight": (ADAMW, False),
}
DENSE_MLP = {
    "mlp.linear_fc1.weight": (MUON, True),
    "mlp.linear_fc2.weight": (MUON, True),
}
MOE_MLP = {
    "mlp.router.weight": (ADAMW, True),
    "mlp.experts.linear_fc1_weight": (MUON, True),  # [experts, 2 x ffn, hidden]: one matrix per expert
    "mlp.experts.linear_fc2_weight": (MUON, True),
    "mlp.shared_experts.linear_fc1.weight": (MUON, True),
    "mlp.shared_experts.linear_fc2.weight": (MUON, True),
}


def _expected(num_layers: int, dense_layers: int) -> dict:
    table = dict(MODEL)
    for i in range(num_layers):
        for suffix, kind in {**ATTENTION, **(DENSE_MLP if i < dense_layers else MOE_MLP)}.items():
            table[f"decoder.layers.{i}.{suffix}"] = kind
    return table


@pytest.fixture(scope="module")
def model_and_optimizer():
    from tests.helpers.model import k2_like_tiny_config, require_no_cuda, teardown_megatron

    require_no_cuda()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron import build_k2_model, init_distributed_cpu
    from k2_megatron.megatron.optimizer import get_muonclip_optimizer

    init_distributed_cpu()
    cfg = k2_like_tiny_config()
    model = build_k2_model(cfg, params_dtype=torch.float32)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, bucket_size=None), model)
    opt = get_muonclip_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, bf16=False,
                                                 use_distributed_optimizer=True), [ddp])
    yield cfg, model, opt
    teardown_megatron()


def test_megatron_optimizer_split_by_name(model_and_optimizer):
    cfg, model, opt = model_and_optimizer
    names = {p: n for n, p in model.named_parameters()}
    got = {}
    for sub in opt.chained_optimizers:
        for group in sub.optimizer.param_groups:
            for main in group["params"]:
                name = names[sub.main_to_model[main]]
                assert name not in got, f"{name} is in two param groups"
                got[name] = (MUON if group["use_muon"] else ADAMW, group["weight_decay"] > 0)
    want = _expected(cfg.num_hidden_layers, cfg.first_k_dense_replace)
    assert set(got) == set(want), f"missing: {sorted(set(want) - set(got))}, unexpected: {sorted(set(got) - set(want))}"
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, f"(got, expected) (optimizer, weight decay): {wrong}"
    # the router's selection bias is a buffer updated from the expert load, never by an optimizer
    assert "decoder.layers.1.mlp.router.expert_bias" in dict(model.named_buffers())


def test_plain_muon_param_groups_split_by_name(model_and_optimizer):
    from k2_megatron.optim import muon_param_groups

    cfg, model, _ = model_and_optimizer
    got = {name: MUON if group["use_muon"] else ADAMW for group in muon_param_groups(model)
           for name in group["param_names"]}
    want = {name: kind for name, (kind, _) in _expected(cfg.num_hidden_layers, cfg.first_k_dense_replace).items()}
    assert got == want, {n: (got.get(n), want.get(n)) for n in set(got) | set(want) if got.get(n) != want.get(n)}
