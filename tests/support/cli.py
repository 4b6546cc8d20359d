"""The `speechgate` command in tests: in this process through click's runner (with the
dependencies a test hands in), or as the installed console script."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from speechgate.cli import main
from speechgate.cli.common import Deps
from speechgate.core.settings import Settings

SPEECHGATE = str(Path(sys.executable).parent / "speechgate")  # the console script of this venv


@dataclass
class Cli:
    deps: Deps
    settings: Settings

    def __call__(self, *args: str, input: str | None = None, code: int = 0) -> Result:
        result = CliRunner().invoke(main, list(args), obj=self.deps, input=input)
        assert result.exit_code == code, (result.output, result.stderr, result.exception)
        return result

    def json(self, *args: str, input: str | None = None) -> Any:
        return json.loads(self(*args, "--json", input=input).stdout)


def audit_lines(result: Result) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if "audit" in line]


def credentials(output: str) -> tuple[str, str]:
    client_id = re.search(r"client_id=(\S+)", output)
    secret = re.search(r"client_secret=(\S+)", output)
    assert client_id is not None
    assert secret is not None
    return client_id.group(1), secret.group(1)
