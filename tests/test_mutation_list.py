"""scripts/mutation_check.py stays usable: every planted bug still applies to the source exactly once, names a test
file that exists, and changes the code (the full run, which executes each mutant's tests, is not part of CI)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_once_and_names_existing_tests():
    mc = _module()
    assert len(mc.MUTATIONS) >= 11 and len({m.name for m in mc.MUTATIONS}) == len(mc.MUTATIONS)
    for m in mc.MUTATIONS:
        assert mc.check_applies(m) is None, (m.name, mc.check_applies(m))
        assert m.original != m.mutated
        for test in m.tests:
            assert (REPO / test.split("::")[0]).is_file(), (m.name, test)
