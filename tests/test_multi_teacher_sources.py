"""Multi-teacher routing by data file and by named dataset (issue 21 item 2; routing.by: file | dataset).

data.train is a list of sources here; every record remembers the source it was read from (Record.origin) and is
routed to that source's teacher. The oracle is the file each record was written to by this test: the split of
tests/assets/data/routed.jsonl by its `source` field, so a record's teacher must also equal its `source` value.
Config errors name the key and the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillm.config import ConfigError, load_config
from minillm.data.records import load_train_records
from minillm.routing import route_records

pytestmark = pytest.mark.usefixtures("one_thread")

ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG = "configs/tiny/multi-teacher.yaml"
SMALL = ["rollout.num_rollouts=16", "rollout.chunk_size=8", "rollout.max_new_tokens=8", "train.micro_batch_size=4",
         "train.global_batch_size=8", "train.eval_interval=0", "train.save_interval=0", "data.pretrain=null",
         "train.select_best_by=none"]


def _count(path: Path) -> int:
    return len(path.read_text().splitlines())


def _split(folder: Path) -> dict[str, Path]:
    """routed.jsonl split by `source` into one file per source: source -> file (records in their original order)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for line in (ASSETS / "data" / "routed.jsonl").read_text().splitlines():
        lines.setdefault(json.loads(line)["source"], []).append(line)
    paths = {}
    for source, rows in lines.items():
        paths[source] = folder / f"{source}.jsonl"
        paths[source].write_text("\n".join(rows) + "\n")
    return paths


def _trainer(cfg):
    from minillm.checkpoint import seed_everything
    from minillm.cli.train import build_trainer
    from minillm.strategy import build_strategy

    strategy = build_strategy(cfg).setup()
    seed_everything(cfg.seed)
    return build_trainer(cfg, strategy)


def test_by_file_each_record_and_rollout_goes_to_its_files_teacher(tmp_path, monkeypatch):
    paths = _split(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a relative spelling in routes must match the absolute path in data.train
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(str(repo / CONFIG), [
        *SMALL, f"output_dir={tmp_path / 'run'}", f"data.train=[{paths['facts']}, {paths['language']}]",
        "routing.by=file", "routing.routes={./data/language.jsonl: language, " + f"{paths['facts']}: facts}}",
        *(f"{k}={repo / v}" for k, v in (("student.path", "tests/assets/student"), ("data.dev",
                                                                                   "tests/assets/data/dev.jsonl"))),
        f"teachers=[{{name: language, path: {repo}/tests/assets/teacher}}, "
        f"{{name: facts, path: {repo}/tests/assets/teacher-b}}]"])
    records = load_train_records(cfg.data.train)
    n_facts, n_language = _count(paths["facts"]), _count(paths["language"])
    assert [r.origin for r in records] == [str(paths["facts"])] * n_facts + [str(paths["language"])] * n_language
    routes = route_records(records, cfg.routing, ["language", "facts"])
    assert [["language", "facts"][t] for t in routes] == [r.fields["source"] for r in records]
    assert routes == [1] * n_facts + [0] * n_language

    trainer = _trainer(cfg)
    data, router = trainer.data, trainer.router
    assert data.stats.train.source == f"{paths['facts']}, {paths['language']}" and data.stats.train.total == 300
    for teacher, subset in enumerate(router.subsets):  # every prompt of a teacher's subset is from its file
        origins = {data.train_records[data.train_prompts.indices[i]].origin for i in subset}
        assert origins == {str(paths[router.names[teacher]])}
    assert sorted(i for s in router.subsets for i in s) == list(range(len(data.train_prompts)))
    phase = next(p for p in range(8) if router.teacher_of_phase(p) == 0)  # a phase of the `language` teacher
    trainer.phase = phase
    buffer = trainer.rollout_and_score()
    assert trainer.teacher is router.models[0]
    assert {data.train_records[int(i)].origin for i in buffer.prompt_index} == {str(paths["language"])}


def test_by_dataset_routes_named_sets_by_name(tmp_path):
    """Two named sets read from the cache folder (no hub): dolly's raw.jsonl and dolly-15k's file."""
    cache = tmp_path / "cache"
    paths = _split(tmp_path / "data")
    for name, filename, source in (("dolly", "raw.jsonl", "language"),
                                   ("dolly-15k", "databricks-dolly-15k.jsonl", "facts")):
        (cache / "sets" / name).mkdir(parents=True)
        (cache / "sets" / name / filename).write_text(paths[source].read_text())
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                               "data.train=[dolly, dolly-15k]", "routing.by=dataset",
                               "routing.routes={dolly-15k: facts}", "routing.default=language"])
    records = load_train_records(cfg.data.train, cache_dir=cfg.data.cache_dir, split="train")
    assert [r.origin for r in records] == ["dolly"] * _count(paths["language"]) + ["dolly-15k"] * _count(paths["facts"])
    routes = route_records(records, cfg.routing, ["language", "facts"])
    assert [["language", "facts"][t] for t in routes] == [r.fields["source"] for r in records]
    from minillm.data import build_instruction_data
    from minillm.models import load_tokenizer

    data = build_instruction_data(cfg.data, load_tokenizer(cfg.student))
    assert [r.origin for r in data.train_records] == [r.origin for r in records]
    assert data.stats.train.source == "dolly, dolly-15k"


def test_a_single_source_is_read_as_before():
    one = load_train_records("tests/assets/data/routed.jsonl")
    listed = load_train_records(["tests/assets/data/routed.jsonl"])
    assert [(r.prompt, r.instruction, r.input, r.references, r.fields, r.where) for r in one] == \
        [(r.prompt, r.instruction, r.input, r.references, r.fields, r.where) for r in listed]
    assert {r.origin for r in one} == {"tests/assets/data/routed.jsonl"}
    assert load_config(CONFIG).data.train == "tests/assets/data/routed.jsonl"


@pytest.mark.parametrize("overrides, message", [
    (["data.train=[a.jsonl, b.jsonl]", "routing.by=file", "routing.routes={a.jsonl: language, c.jsonl: facts}"],
     "`routing.routes.c.jsonl`: routes file `c.jsonl`, which is not in data.train"),
    (["data.train=[a.jsonl, b.jsonl]", "routing.by=file", "routing.routes={a.jsonl: language}"],
     "`routing.routes`: data.train source `b.jsonl` has no route (routing.by=file)"),
    (["data.train=[dolly, vicuna]", "routing.by=dataset", "routing.routes={dolly: language, vicunaa: facts}"],
     "`routing.routes.vicunaa`: routes dataset `vicunaa`, which is not in data.train"),
    (["data.train=[dolly, vicuna]", "routing.by=dataset", "routing.routes={dolly: language}"],
     "`routing.routes`: data.train source `vicuna` has no route (routing.by=dataset)"),
    (["data.train=[dolly, vicuna]", "routing.by=dataset", "routing.routes={dolly: language, vicuna: math}"],
     "`routing.routes.vicuna`: unknown teacher `math`"),
    (["data.train=[a.jsonl, ./a.jsonl]"], "`data.train[1]`"),
    (["data.train=[]"], "`data.train`: needs a source"),
    (["data.train=5"], "`data.train` must be str or list[str], got 5"),
    (["data.train=[a.jsonl, 3]"], "`data.train` must be str or list"),
])
def test_source_routing_errors_name_the_key_and_the_source(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert message in str(err.value), str(err.value)


def test_a_default_routes_the_sources_without_a_route(tmp_path):
    cfg = load_config(CONFIG, ["data.train=[dolly, vicuna]", "routing.by=dataset", "routing.routes={vicuna: facts}",
                               "routing.default=language"])
    from minillm.data.records import Record

    records = [Record(instruction="x", references=["y"], origin=o) for o in ("dolly", "vicuna", "dolly")]
    assert route_records(records, cfg.routing, ["language", "facts"]) == [0, 1, 0]
