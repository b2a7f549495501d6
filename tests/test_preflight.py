"""The teacher/student pre-flight check (minillm.preflight, `minillm-check --config`, the start of minillm-train):
one case per check, each with tokenizer and model folders made here from the tiny assets with one thing changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from minillm.cli.check import main as check_main
from minillm.cli.train import main as train_main
from minillm.config import load_config
from minillm.preflight import ERROR, INFO, WARNING, preflight

ASSETS = Path(__file__).resolve().parent / "assets"
TINY = ["data.train=tests/assets/data/train.jsonl", "data.dev=tests/assets/data/dev.jsonl"]


def _copy(tmp_path: Path, who: str) -> Path:
    out = tmp_path / who
    shutil.copytree(ASSETS / who, out)
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _retokenize(folder: Path, edit) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    edit(tok)
    tok.save_pretrained(folder)


def _findings(teacher: Path | str = ASSETS / "teacher", student: Path | str = ASSETS / "student", method="kd",
              extra=(), device_type="cpu"):
    cfg = load_config(None, [f"method={method}", f"student.path={student}", f"teacher.path={teacher}", *TINY,
                             "data.max_prompt_length=96", "data.max_length=128", *extra])
    return preflight(cfg, device_type=device_type)


def _only(findings, severity):
    return [f for f in findings if f.severity == severity]


def test_the_shipped_tiny_pair_is_clean():
    findings = _findings()
    assert not _only(findings, ERROR) and not _only(findings, WARNING), [f.line() for f in findings]
    assert any(f.check == "tokenization" and "identically" in f.message for f in _only(findings, INFO))


def test_a_teacher_with_another_eos_is_an_error_naming_eos(tmp_path):
    teacher = _copy(tmp_path, "teacher")
    _retokenize(teacher, lambda tok: setattr(tok, "eos_token", tok.convert_ids_to_tokens(5)))
    findings = _findings(teacher)
    errors = _only(findings, ERROR)
    assert [f.check for f in errors] == ["EOS"], [f.line() for f in findings]
    assert "id 0" in errors[0].message and "id 5" in errors[0].message and errors[0].fix


def test_different_vocabularies_are_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    teacher = _copy(tmp_path, "teacher")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["a completely different corpus " * 20], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<pad>").save_pretrained(teacher)
    findings = _findings(teacher)
    assert any(f.check == "vocabulary" and "tokenizers differ" in f.message for f in _only(findings, ERROR))


def test_same_vocabulary_but_another_encoding_is_an_error(tmp_path):
    """Same entries, same special tokens, but a lower-casing normaliser: ids differ on real records."""
    from tokenizers import normalizers

    teacher = _copy(tmp_path, "teacher")
    _retokenize(teacher, lambda tok: setattr(tok.backend_tokenizer, "normalizer", normalizers.Lowercase()))
    findings = _findings(teacher)
    errors = _only(findings, ERROR)
    assert [f.check for f in errors] == ["tokenization"], [f.line() for f in findings]
    assert "train.jsonl:" in errors[0].message


def test_chat_templates_that_render_differently_are_an_error(tmp_path):
    teacher = _copy(tmp_path, "teacher")
    (teacher / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
        "<assistant>{% endif %}")
    assert not _only(_findings(teacher), ERROR)  # the reference template never uses it
    findings = _findings(teacher, extra=["data.template=chat"])
    assert any(f.check == "chat template" and "differently" in f.message for f in _only(findings, ERROR)), \
        [f.line() for f in findings]


def test_too_few_positions_is_an_error():
    findings = _findings(extra=["data.max_prompt_length=256", "data.max_length=1024"])
    errors = _only(findings, ERROR)
    assert {f.check for f in errors} == {"lengths"} and len(errors) == 2  # student and teacher
    assert "512 positions" in errors[0].message and "data.max_length=1024" in errors[0].message


def test_output_rows_below_the_tokenizer_are_an_error(tmp_path):
    student = _copy(tmp_path, "student")
    _edit_json(student / "config.json", vocab_size=400)  # the check never loads the weights
    findings = _findings(student=student)
    assert any(f.check == "vocabulary" and "400 output rows" in f.message for f in _only(findings, ERROR))


def test_a_teacher_sampling_config_differing_from_the_run_is_a_warning(tmp_path):
    teacher = _copy(tmp_path, "teacher")
    _edit_json(teacher / "generation_config.json", do_sample=True, temperature=0.6, top_p=0.9)
    findings = _findings(teacher, method="minillm", extra=["rollout.max_new_tokens=24"])
    warnings = [f for f in _only(findings, WARNING) if f.check == "sampling"]
    assert warnings and "temperature=0.6" in warnings[0].message and "top_p=0.9" in warnings[0].message
    assert not _only(findings, ERROR)


def test_generation_config_eos_not_the_tokenizers_is_a_warning(tmp_path):
    teacher = _copy(tmp_path, "teacher")
    _edit_json(teacher / "generation_config.json", eos_token_id=[7])
    findings = _findings(teacher)
    assert any(f.check == "EOS" and "[7]" in f.message for f in _only(findings, WARNING))
    assert not _only(findings, ERROR)


def test_logit_post_processing_and_dtype_advice_are_warnings(tmp_path):
    teacher = _copy(tmp_path, "teacher")
    _edit_json(teacher / "config.json", final_logit_softcapping=30.0)
    findings = _findings(teacher, extra=["student.dtype=bf16"], device_type="cuda")
    checks = {f.check for f in _only(findings, WARNING)}
    assert checks == {"logits", "dtype"}, [f.line() for f in findings]


def test_minillm_check_config_exit_codes(tmp_path, capsys):
    assert check_main(["--config", "configs/tiny/kd.yaml"]) == 0
    teacher = _copy(tmp_path, "teacher")
    _retokenize(teacher, lambda tok: setattr(tok, "eos_token", tok.convert_ids_to_tokens(5)))
    assert check_main(["--config", "configs/tiny/kd.yaml", f"teacher.path={teacher}"]) == 2
    assert "error   EOS" in capsys.readouterr().err
    assert check_main(["--config", "configs/tiny/kd.yaml", "teacher.path=/no/such/folder"]) == 2


def test_minillm_train_stops_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import minillm.models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded although the pre-flight check had failed")

    monkeypatch.setattr(minillm.models, "load_model", never)
    teacher = _copy(tmp_path, "teacher")
    _retokenize(teacher, lambda tok: setattr(tok, "eos_token", tok.convert_ids_to_tokens(5)))
    code = train_main(["--config", "configs/tiny/kd.yaml", f"teacher.path={teacher}", f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "pre-flight: error   EOS" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
