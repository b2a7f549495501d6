"""``student.peft`` (LoRA students through peft) and adapter folders as models, in process on the tiny assets.

Oracles: parameters compared bit for bit before/after training (only the adapter moves), peft's own
``merge_and_unload`` for the merged export, the adapted model's own logits for the merged folder and for adapter
teachers, the plain losses for the chunked ones, and a bf16 cast / the dynamic cache for the sampling copy and the
fast engine. The CLI runs (kd, minillm, resume, ZeRO-3) are in test_peft_e2e.py.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

pytest.importorskip("peft")

from test_chunked_losses import assert_same, build, loss_and_grads  # noqa: E402
from test_sampling import PAD, left_padded_prompts, tiny_gpt2, tiny_llama  # noqa: E402

from minillm.adapter_config import PeftConfig  # noqa: E402
from minillm.adapters import add_adapter, adapter_state_dict, merged_state_dict, save_adapter, save_merged  # noqa: E402
from minillm.config import ConfigError, ModelConfig, load_config  # noqa: E402
from minillm.models import load_model, load_model_shape, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py

ALL_PROJECTIONS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
LORA = ["student.peft.method=lora", "student.peft.r=4", f"student.peft.target_modules={ALL_PROJECTIONS}"]


def lora_cfg(**kw) -> PeftConfig:
    return PeftConfig(method="lora", r=4, alpha=8.0, **kw)


def randomize_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """lora_B starts at zero (the adapter changes nothing); random factors make every check see the adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_merged(base_path, adapter_dir) -> torch.nn.Module:
    """peft's own merge of an adapter folder into a fresh base: the oracle of every merged export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter_dir)).merge_and_unload()


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    (["student.peft.r=0"], "student.peft.r"), (["student.peft.dropout=1.0"], "student.peft.dropout"),
    (["student.peft.target_modules=[]"], "student.peft.target_modules"),
    (["student.peft.target_modules=[all-linear,q_proj]"], "student.peft.target_modules"),
    (["teacher.peft.method=lora"], "teacher.peft.method")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config("configs/tiny/kd.yaml", ["student.peft.method=lora", *override])


def test_unknown_modules_fail_at_load_time_naming_the_modules_that_exist(assets):
    for field, value in (("target_modules", ["q_proj", "qkv_proj"]), ("modules_to_save", ["head"])):
        cfg = ModelConfig(path=str(assets / "student"), peft=lora_cfg(**{field: value}))
        with pytest.raises(ConfigError, match=rf"`student\.peft\.{field}`: \['{value[-1]}'\].*'down_proj'.*'q_proj'"):
            load_model(cfg, trainable=True)
    # module names resolve as peft resolves them: last components or a dotted suffix; all-linear stands alone
    for targets in (["self_attn.q_proj", "mlp.up_proj"], ["all-linear"]):
        model = load_model(ModelConfig(path=str(assets / "student"), peft=lora_cfg(target_modules=targets)),
                           trainable=True)
        assert any("lora_A" in n for n, _ in model.named_parameters())


# --------------------------------------------------------------------------------------------- training
def test_only_the_adapter_gets_gradients_optimizer_state_and_changes(tmp_path):
    trainer = build("kd", tmp_path, [*LORA, "train.max_steps=2", "train.eval_interval=0", "train.save_interval=0"],
                    padded=False)  # resized embeddings would make peft save them with the adapter
    student = trainer.student
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    adapter = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    # 2 layers x 7 projections x (A, B); the head and embeddings stay frozen
    assert len(adapter) == 28 and {n for n, p in student.named_parameters() if p.requires_grad} == adapter
    optimized = {id(p) for g in trainer.strategy.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in student.named_parameters() if n in adapter}
    _, _, grads = loss_and_grads(trainer, lambda: trainer.compute_loss(next(trainer._micro_batches())))
    assert set(grads) == adapter
    student.zero_grad(set_to_none=True)
    trainer.train()
    after = dict(student.named_parameters())
    for name, old in before.items():
        if name in adapter:
            assert not torch.equal(after[name], old), f"{name} did not train"
        else:
            assert torch.equal(after[name], old), f"{name} is frozen but changed"
    state = trainer.strategy.optimizer.state
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values()) == \
        2 * sum(after[n].numel() for n in adapter)

    # final/: merged weights under the base names, loadable without peft, equal to peft's own merge of
    # final/adapter/ bit for bit, and computing the adapted student's logits
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = tmp_path / "final"
    merged = load_file(str(final / "model.safetensors"))
    oracle = peft_merged(trainer.cfg.student.path, final / "adapter").state_dict()
    assert merged.keys() == oracle.keys()
    for key, value in merged.items():
        assert torch.equal(value, oracle[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(ALL_PROJECTIONS.strip("[]").split(","))


def test_modules_to_save_trains_the_lm_head_and_merges_its_trained_copy(assets):
    model = load_model(ModelConfig(path=str(assets / "student"), peft=lora_cfg(modules_to_save=["lm_head"])),
                       trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert not any(n.startswith("model.embed_tokens") for n in trainable)  # embeddings: frozen unless named
    randomize_adapter(model)
    merged = merged_state_dict(model)
    assert torch.equal(merged["lm_head.weight"], model.lm_head.modules_to_save["default"].weight)
    assert not torch.equal(merged["lm_head.weight"], model.lm_head.original_module.weight)


def test_adapter_folder_round_trip_and_merge_equal_peft(tmp_path, assets):
    model = load_model(ModelConfig(path=str(assets / "student"), peft=lora_cfg(modules_to_save=["lm_head"],
                                                                               target_modules=["q_proj", "up_proj"])),
                       trainable=True)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    merged, oracle = merged_state_dict(model), peft_merged(assets / "student", tmp_path / "adapter").state_dict()
    assert merged.keys() == oracle.keys()
    for key in merged:
        assert torch.equal(merged[key], oracle[key]), key
    # load_model merges an adapter folder once: a plain frozen model computing the adapted logits
    frozen = load_model(ModelConfig(path=str(tmp_path / "adapter")), trainable=False)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in frozen.named_parameters())
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(frozen(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    # the folder holds no tokenizer: the base model's is used; shapes come from the base config
    assert len(load_tokenizer(ModelConfig(path=str(tmp_path / "adapter")))) == 512
    assert load_model_shape(ModelConfig(path=str(tmp_path / "adapter"))).lm_head.weight.shape == (512, 32)
    from safetensors.torch import load_file

    assert adapter_state_dict(model).keys() == load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()


def test_gpt2_conv1d_layers_and_tied_embeddings_merge_into_a_loadable_folder(tmp_path):
    """GPT-2: Conv1D projections (peft's fan_in_fan_out: the delta is transposed) under peft's default target
    (c_attn), and an LM head tied to the token embeddings that must stay tied in the merged folder."""
    from transformers import AutoModelForCausalLM

    model = add_adapter(tiny_gpt2(40, seed=3), PeftConfig(method="lora", r=4, alpha=8.0), "tiny-gpt2", seed=0)
    assert {n.rsplit(".", 3)[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"c_attn"}
    randomize_adapter(model)
    save_merged(model.eval(), tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_a_lora_student_the_same_gradients(tmp_path):
    results = []
    for checkpointing in ("false", "true"):
        trainer = build("kd", tmp_path / checkpointing, [*LORA, f"student.gradient_checkpointing={checkpointing}"],
                        padded=False)
        randomize_adapter(trainer.student)
        results.append(loss_and_grads(trainer, lambda: trainer.compute_loss(next(trainer._micro_batches()))))
    assert_same(*results)
    assert len(results[1][2]) == 28


def test_an_adapter_teacher_gives_the_merged_teachers_kd_loss(tmp_path, assets):
    """teacher.path = an adapter folder: the KD loss and gradients equal those with the merged teacher folder."""
    teacher = load_model(ModelConfig(path=str(assets / "teacher"), peft=lora_cfg(target_modules=["v_proj", "o_proj"])),
                         trainable=True)
    randomize_adapter(teacher, seed=3)
    save_adapter(teacher, tmp_path / "teacher-adapter")
    peft_merged(assets / "teacher", tmp_path / "teacher-adapter").save_pretrained(tmp_path / "teacher-merged")
    results = []
    for path in (tmp_path / "teacher-merged", tmp_path / "teacher-adapter"):
        trainer = build("kd", tmp_path / path.name, [f"teacher.path={path}", "teacher.tokenizer=tests/assets/teacher"])
        results.append(loss_and_grads(trainer, lambda: trainer.compute_loss(next(trainer._micro_batches()))))
    assert_same(*results)
    plain = build("kd", tmp_path / "plain", [])
    loss, _, _ = loss_and_grads(plain, lambda: plain.compute_loss(next(plain._micro_batches())))
    assert abs(float(loss) - float(results[0][0])) > 1e-4  # the adapter really changed the teacher


# --------------------------------------------------------------------------------------------- loss paths
@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_kd_chunked_equals_plain_with_lora_on_attention_and_mlp(tmp_path, divergence):
    trainer = build("kd", tmp_path, [*LORA, "kd.chunked=false", "kd.chunk_size=7", f"kd.divergence={divergence}"])
    randomize_adapter(trainer.student)
    batch = next(trainer._micro_batches())
    plain = loss_and_grads(trainer, lambda: trainer.compute_loss(batch))
    trainer.cfg.kd.chunked = True
    chunked = loss_and_grads(trainer, lambda: trainer.compute_loss(batch))
    assert_same(plain, chunked)
    assert len(chunked[2]) == 28 and all("lora_" in n for n in chunked[2])


def test_minillm_chunked_equals_plain_with_lora_on_attention_and_mlp(tmp_path):
    trainer = build("minillm", tmp_path, [*LORA, "minillm.loss_chunk_size=37", "minillm.chunked_losses=false",
                                          "rollout.num_rollouts=8", "train.global_batch_size=8",
                                          "rollout.max_new_tokens=12"])
    randomize_adapter(trainer.student)
    buffer = trainer.rollout_and_score()
    mb = buffer.select(torch.arange(8))
    pt_batch = trainer._next_pt_batch()
    trainer._next_pt_batch = lambda: pt_batch
    plain = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(mb))
    trainer.cfg.minillm.chunked_losses = True
    chunked = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(mb))
    assert_same(plain, chunked)
    assert {"pg_loss", "single_step_kl", "pt_loss"} <= chunked[1].keys() and len(chunked[2]) == 28


# --------------------------------------------------------------------------------------------- decoding paths
def lora_llama(vocab: int, seed: int) -> torch.nn.Module:
    model = add_adapter(tiny_llama(vocab, seed=seed), lora_cfg(target_modules=["q_proj", "v_proj", "down_proj"]),
                        "tiny", seed=seed)
    randomize_adapter(model, seed)
    return model.eval()


def test_bf16_sampling_copy_of_a_lora_student_computes_like_its_cast():
    from minillm.strategy import HalfPrecisionCopy

    source = lora_llama(50, seed=4).train()
    half = HalfPrecisionCopy(source, torch.bfloat16)
    oracle = copy.deepcopy(source).eval()
    for p in oracle.parameters():
        p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(half.refresh()(ids).logits, oracle(ids).logits)
        for n, p in source.named_parameters():  # training moves the adapter: a refresh follows it
            if "lora_B" in n:
                p.add_(1.0)
        moved = copy.deepcopy(source).eval()
        for p in moved.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert torch.equal(half.refresh()(ids).logits, moved(ids).logits)


def test_fast_engine_static_cache_decoding_of_a_lora_student_equals_the_dynamic_cache():
    """The engine calls the model's inner decoder with static caches: the adapter layers inside it apply (the
    compiled decode step over them was checked by hand, ~60 s of compilation on 2 cores: not in the suite)."""
    from minillm.generation.engine import fast_mixed_sample

    student, teacher = lora_llama(32, seed=1), tiny_llama(32, seed=2)
    ids, mask = left_padded_prompts(32, [3, 5, 1], seed=0)
    run = lambda static: fast_mixed_sample(  # noqa: E731
        student, teacher, ids, mask, max_new_tokens=8, alpha=0.3, eos_token_id=None, pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0), static_cache=static, cuda_graphs=False)
    dynamic, static = run(False), run(True)
    assert torch.equal(static.response_ids, dynamic.response_ids)
    torch.testing.assert_close(static.student_logprobs, dynamic.student_logprobs, atol=1e-5, rtol=1e-5)
    # and the adapter is really in the decoded model: the base alone decodes other log-probs
    from minillm.generation.sampling import teacher_forced_logprobs

    base = copy.deepcopy(student)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.zero_()
    forced = teacher_forced_logprobs(base, ids, mask, dynamic.response_ids, dynamic.response_mask)
    assert (forced - dynamic.student_logprobs).abs().max() > 1e-3


def test_optimizer_state_memory_with_and_without_lora():
    """AdamW holds two moments per trainable parameter: with LoRA r=4 on every projection of the tiny student that
    is 4,352 of its 53,408 weights (benchmarks/peft_optimizer_memory.py writes these figures, and LLaMA-7B's, to
    benchmarks/results/peft-optimizer-memory.json)."""
    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from peft_optimizer_memory import tiny

    result = tiny(r=4)
    full, lora = result["full"], result["lora_r4_all_projections"]
    # per layer: q, k, v, o (32 -> 32): 4 x r(32 + 32); gate, up, down (32 <-> 64): 3 x r(32 + 64); 2 layers
    assert lora["trainable_parameters"] == 2 * (4 * 4 * 64 + 3 * 4 * 96) == 4352
    assert full["trainable_parameters"] == full["parameters"] == 53408
    for entry in (full, lora):
        assert entry["optimizer_moment_elements"] == 2 * entry["trainable_parameters"]
    print(f"optimizer state: full {full['optimizer_state_bytes']:,} B, LoRA r=4 {lora['optimizer_state_bytes']:,} B")
