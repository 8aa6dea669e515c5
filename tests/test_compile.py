"""train.compile=true: torch.compile'd training through the CLI on both backends, compile time reported apart.

Compiling on the CPU builds C++ kernels (a minute or more on two cores, cached afterwards in the
inductor cache), so one tiny run carries the check; the held-out split is off so that only the
training graph is compiled.
"""

from __future__ import annotations

import math

from conftest import read_csv_rows

STEPS = 4
COMPILE_RUN = ["data.val_fraction=0", f"train.max_steps={STEPS}", "train.lr=0.05", "log.every=1", "checkpoint.every=0"]


def test_compiled_training_matches_eager_losses_on_both_backends_and_reports_compile_time(cli, tiny, tmp_path):
    eager = cli.ok(cli("train", *tiny, *COMPILE_RUN, "run.output_dir=eager", cwd=tmp_path))
    eager_rows = read_csv_rows(tmp_path / "eager" / "losses_log.csv")
    assert "compile:" not in eager.stdout
    # The engine compiles the same graph: it comes from the inductor cache the first run filled.
    for backend in ("torch", "deepspeed"):
        run = f"compiled_{backend}"
        compiled = cli.ok(cli("train", *tiny, *COMPILE_RUN, f"run.output_dir={run}", "train.compile=true",
                              f"train.backend={backend}", cwd=tmp_path))
        rows = read_csv_rows(tmp_path / run / "losses_log.csv")
        assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
        for ours, theirs in zip(rows, eager_rows):
            for key in ("train_loss", "grad_norm", "lr"):
                assert math.isclose(float(ours[key]), float(theirs[key]), rel_tol=1e-4), (backend, key, ours, theirs)
        losses = [float(r["train_loss"]) for r in rows]
        assert losses[-1] < losses[0], "four steps at lr 0.05 should learn something"
        compile_lines = [line for line in compiled.stdout.splitlines() if line.startswith("compile:")]
        assert len(compile_lines) == 1 and "step 1 took" in compile_lines[0], compiled.stdout
        # The compiling step is kept out of samples/s: step 1 has none, later steps do.
        assert rows[0]["samples_per_s"] == "" and all(float(r["samples_per_s"]) > 0 for r in rows[1:])


def test_compile_without_a_cpp_compiler_is_refused_in_one_line(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    result = cli("train", *tiny, *COMPILE_RUN, "train.compile=true", cwd=tmp_path)
    cli.user_error(result, "train.compile=true", "no-such-compiler++", "train.compile=false")
