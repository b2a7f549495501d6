"""Shared fixtures: offline mode, CPU DeepSpeed, the committed tiny assets."""

import os

# Unconditionally: an exported HF_HUB_OFFLINE=0 must not send the suite to the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"


# Under pytest-xdist (scripts/test.sh: `-n 2`), tests are dealt to the two workers one by one in collection order.
# The longest modules go first, so that no worker starts a long test while the other is about to finish
# (longest-first scheduling; serial seconds on 2 cores in the comments). Everything else keeps pytest's order.
LONGEST_MODULES_FIRST = (
    "test_demo_quick.py",             # 150: the quick demo on the real SmolLM2 teacher
    "test_deepspeed.py",              # 75: 2-rank ZeRO runs
    "test_demo.py",                   # 55: the tiny demo, rerun and variants
    "test_pipeline.py",               # 50: the tiny Table-1 chain
    "test_preemption_processes.py",   # 42: kill -9 and SIGTERM of real runs
    "test_distributed_safety.py",     # 35
    "test_train_e2e.py",              # 35
    "test_multi_teacher_deepspeed.py",  # 25
    "test_bench_phase.py",            # 25
    "test_peft_e2e.py",               # 25
    "test_eval_distributed.py",       # 20
    "test_assets.py",                 # 20
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a plain run keeps pytest's order

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_MODULES_FIRST.index(name) if name in LONGEST_MODULES_FIRST else len(LONGEST_MODULES_FIRST)

    items.sort(key=rank)  # stable: the order inside a module, and among the rest, is unchanged


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    """Every test runs from the repository root (recipes name their assets relative to it), and whatever
    directory a test moves to is restored after it."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead, and many calls make it add up on a shared 2-core box.
    Modules of many tiny-model calls opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile with dynamo for real but a pass-through backend instead of inductor (fast on CPU); returns the
    list that gets one entry per graph dynamo hands the backend (each compile or recompile)."""
    import torch

    graphs: list[int] = []

    def counting_backend(graph, example_inputs):
        graphs.append(1)
        return graph.forward

    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **config: original(function, backend=counting_backend))
    return graphs
