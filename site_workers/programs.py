"""``program.<name>``: command-line programs a site declares, run with typed arguments, no shell, in a confined scratch directory.

The administrator declares each program in the site config (``programs:``, see
`site_workers.adapter_config.ProgramConfig`): its executable, an argv template,
typed parameters, the `DataRef` inputs staged as files, and the one output file
that becomes the result. A request carries only parameter values and
references; the site validates them, stages the inputs into a fresh scratch
directory, fills the template (each item stays one argument) and runs the
executable through the same containment runner as ``code.python``
(`site_workers.containment`: every process it starts dies with it) and
`site_workers.sandbox` (resource limits, writes only in the scratch directory,
no TCP). The output file is read back under a size limit into a table, a JSON
value or text, and kept at the site like any result.

Example (in a flow, for a site that declares ``smooth``):

```python
from dfm_prefect import get_client

ref = get_client().call("lab", "program.smooth", {"window": 7, "series": table_ref})
```
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from adapters.declared import bound_operation, params_model
from dfm_prefect.core.errors import OperationFailedError
from dfm_prefect.core.operations import DataInput, Operation
from site_workers import containment, sandbox
from site_workers.adapter_config import ProgramConfig
from site_workers.user_code import _exit_code, _stop, _tail

_TICK = 0.1


def bind_programs(configs: list[ProgramConfig], offered: list[str]) -> dict[str, Operation]:
    """One operation per declared program (the ``dfm_prefect.site_bindings`` entry point ``programs``)."""
    ops = {}
    for program in configs:
        name = f"program.{program.name}"
        inputs = {key: (DataInput, ...) for key in program.inputs}
        ops[name] = bound_operation(
            partial(run_program, program),
            name=name,
            result=program.output.kind,
            params=params_model(name, program.params, extra=inputs),
            description=program.description or f"Runs {Path(program.executable).name} with typed arguments in a confined scratch directory.",
        )
    return ops


def run_program(program: ProgramConfig, params: Any, ctx: Any) -> Any:
    """Stage the inputs, run the program confined, read its output file back."""
    with tempfile.TemporaryDirectory(prefix=f"dfm-program-{program.name}-") as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        files = {key: _stage(ctx, getattr(params, key), work / f"{key}.{spec.format}", spec.format) for key, spec in program.inputs.items()}
        values = {key: _argument(getattr(params, key)) for key in program.params}
        argv = [item.format_map({**values, **files}) for item in program.argv]
        _execute(program, [program.executable, *argv], Path(scratch), work, ctx)
        return _read_output(program, work)


def _argument(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    if "\x00" in text:  # cannot be passed in argv at all
        raise OperationFailedError("an argument holds a NUL character")
    return text


def _stage(ctx: Any, data: Any, path: Path, fmt: str) -> str:
    """Write an input (a `DataRef` held here, or a source) as a file the program reads."""
    import pandas as pd

    value = ctx.open(data)
    if hasattr(value, "dask") and hasattr(value, "columns"):  # a Dask dataframe (a table source)
        (value,) = ctx.compute(value)
    if fmt == "netcdf":
        value.to_netcdf(path)
    elif isinstance(value, pd.DataFrame):
        value.to_parquet(path, index=False) if fmt == "parquet" else value.to_csv(path, index=False) if fmt == "csv" else value.to_json(path, orient="records")
    elif fmt == "json":
        path.write_text(json.dumps(value))
    else:
        raise OperationFailedError(f"input {path.stem!r} is a {type(value).__name__}, which cannot be staged as {fmt}")
    return str(path)


def _environment(program: ProgramConfig, work: Path) -> dict[str, str]:
    # Nothing from the site's own environment: that is where its credentials live.
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8", **program.env}


def _execute(program: ProgramConfig, command: list[str], scratch: Path, work: Path, ctx: Any) -> None:
    settings = {
        "limits": {"RLIMIT_CPU": program.cpu_s, "RLIMIT_AS": program.memory_bytes, "RLIMIT_FSIZE": program.max_file_bytes, "RLIMIT_CORE": 0},
        "confine": program.confine_writes,
        "network": program.network,
        "scratch": str(work),
    }
    confined = [sys.executable, "-I", sandbox.__file__, json.dumps(settings), "--", *command]
    status_path = scratch / "status.json"
    runner = [sys.executable, "-I", containment.__file__, str(os.getpid()), str(status_path), "--", *confined]
    output_path = scratch / "output.txt"
    timed_out = False
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            runner, cwd=work, env=_environment(program, work), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
        try:
            deadline = time.monotonic() + program.timeout_s
            # A child's exit and the client's cancel cannot be waited on together: check both every tick.
            while process.poll() is None:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                if ctx.wait_cancelled(_TICK):
                    break
        finally:
            _stop(process)
    ctx.check_cancelled()
    printed = _tail(output_path, ctx)
    if timed_out:
        raise OperationFailedError(f"program {program.name!r} ran past its {program.timeout_s:g} s limit and was stopped")
    code = _exit_code(status_path, printed)
    if code == sandbox.UNCONFINED:
        raise OperationFailedError(
            f"program {program.name!r} was not run: this site cannot keep its writes in its scratch directory ({printed}); "
            "its administrator can run the site on a kernel with Landlock, or set confine_writes: false"
        )
    if code != 0:
        raise OperationFailedError(f"program {program.name!r} failed (exit status {code}); the end of its output:\n{printed}")
    if printed:
        ctx.log.info("output of %s:\n%s", program.name, printed)


def _read_output(program: ProgramConfig, work: Path) -> Any:
    import pandas as pd

    spec = program.output
    path = work / spec.path
    if not path.is_file() or path.is_symlink():
        raise OperationFailedError(f"program {program.name!r} wrote no file {spec.path!r}")
    size = path.stat().st_size
    if size > spec.max_bytes:
        raise OperationFailedError(f"program {program.name!r} wrote {size} bytes to {spec.path!r}; the site reads at most {spec.max_bytes}")
    try:
        if spec.format == "csv":
            return pd.read_csv(path)
        if spec.format == "parquet":
            return pd.read_parquet(path)
        if spec.format == "json":
            return json.loads(path.read_text())
        return path.read_text(errors="replace")
    except (ValueError, OSError) as exc:
        raise OperationFailedError(f"program {program.name!r} wrote {spec.path!r}, which is not {spec.format} ({type(exc).__name__})") from None
