"""The scripts under ``benchmarks/`` run and print their tables (tiny sizes; timings are not checked)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_cost_times_methods_against_fm_and_compares_backends(capsys):
    method_cost = _script("method_cost")
    assert method_cost.main(["--methods", "lsd", "ct", "--repeats", "1", "--warmup", "1", "--no-memory",
                             "--batch", "32", "--width", "16", "--depth", "2", "--compare-backend", "func"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"fm", "lsd", "ct"}
    assert rows["fm"].split("|")[7].strip() == "1.00"  # time / fm of fm itself
    assert rows["lsd"].split("|")[10].strip() != "" and rows["ct"].split("|")[10].strip() == ""  # ct takes no JVP
