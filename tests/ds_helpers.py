"""Several ``python -m seemore_ds`` commands inside one deepspeed launch, to pay the start-up once.

    deepspeed --num_gpus 2 --module tests.ds_helpers PLAN.json

PLAN.json is a list of argument lists, each exactly what a user would type after
``python -m seemore_ds``. Every rank runs them in order; the first non-zero exit code ends the
launch with that code (and the launcher ends the other ranks).
"""

from __future__ import annotations

import json

from seemore_ds.__main__ import main
from seemore_ds.launching import end_process, script_arguments


def run_plan(plan_file: str) -> int:
    for argv in json.loads(open(plan_file, encoding="utf-8").read()):
        code = main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    end_process(run_plan(script_arguments()[0]))
