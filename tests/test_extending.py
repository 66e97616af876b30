"""``docs/extending.md`` runs as written: its method, dropped into a copy of the package as one new file,
is picked up by the CLI, the bench and the registry-driven tests; its backbone, sampler and teacher
pass the checks of their registries."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flowmaps

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(), flags=re.S)
METHOD, BACKBONE, SAMPLER, TEACHER = BLOCKS


def run(args: list[str], path: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def package_with_new_method(tmp_path_factory):
    """A copy of the package with the doc's method saved as ``methods/lagrangian/lsd_fd.py``."""
    root = tmp_path_factory.mktemp("extended")
    shutil.copytree(Path(flowmaps.__file__).parent, root / "flowmaps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "flowmaps" / "methods" / "lagrangian" / "lsd_fd.py").write_text(METHOD)
    assert run(["-c", "import flowmaps; print(flowmaps.__file__)"], root).stdout.strip().startswith(str(root))
    return root


@pytest.mark.slow
def test_the_new_method_reaches_the_cli_the_bench_and_the_contract_tests(package_with_new_method, tmp_path):
    path = package_with_new_method
    listing = run(["-m", "flowmaps", "methods"], path).stdout
    assert "lsd-fd" in listing
    assert "fd_step" in run(["-m", "flowmaps", "methods", "lsd-fd"], path).stdout
    run(["-m", "flowmaps", "train", "--method", "lsd-fd", "--steps", "20", "--batch-size", "64", "--no-progress",
         "--set", "model.width=32", "--set", "model.depth=1", "--set", "eval.n_samples=256",
         "--set", "eval.ode_steps=2", "--set", "method.fd_step=1e-4", "--out", str(tmp_path / "run")], path)
    bench = run(["-m", "flowmaps", "bench", "--quick", "--methods", "lsd-fd", "--seeds", "1", "--steps", "10",
                 "--no-progress", "--out", str(tmp_path / "bench")], path).stdout
    assert "| lsd-fd |" in bench
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/methods/test_registry_contract.py",
                 "-k", "lsd-fd"], path).stdout
    assert re.search(r"\b5 passed\b", tests), tests  # the registry contract: 5 tests for a method with a diagonal split


def test_the_backbone_sampler_and_teacher_examples_pass_their_checks(tmp_path):
    script = "\n".join([BACKBONE, SAMPLER, TEACHER, textwrap.dedent("""
        from tests.nets import test_backbones
        from tests import test_samplers
        from flowmaps.build import config_from_dict
        from flowmaps.train.loop import train

        test_backbones.test_the_backbone_predicts_a_velocity_shaped_like_the_data("concat-mlp")
        for backend in test_backbones.BACKENDS:
            test_backbones.test_tangents_and_their_gradients_match_finite_differences("concat-mlp", backend)
        test_samplers.test_every_registered_sampler_reproduces_the_exact_map("power_grid")
        cfg = config_from_dict({"model": {"backbone": "concat-mlp", "width": 16, "depth": 2},
                                "train": {"steps": 3, "batch_size": 32, "device": "cpu"},
                                "checkpoint": {"every": 0}})
        train(cfg, OUT, progress=False, evaluate_at_end=False)
        print("examples ok")
        """).replace("OUT", repr(str(tmp_path / "run")))])
    assert "examples ok" in run(["-c", script], ROOT / "src").stdout
