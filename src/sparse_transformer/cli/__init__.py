"""The ``sparse-transformer`` command line: one module per command, each owning its parser.

Every command reports bad input as one line on stderr and exit code 2. A command
module has ``add(subparsers)``, which registers its parser and sets ``run``; adding
a command is one module and one entry in COMMANDS.
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import sys
from pathlib import Path

from ..sysutil import tune_malloc
from ..train.distributed import DistributedFailure
from ..train.guard import Diverged, Stopped
from . import bench, data, evaluate, pictures, sample, train
from .common import Parser, UsageError

COMMANDS = (train, evaluate, sample, data, bench, pictures)


def build_parser() -> Parser:
    parser = Parser(
        prog="sparse-transformer",
        description="Sparse Transformers (Child et al., 2019): exact strided and fixed attention in PyTorch.",
    )
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a Python module (by name) or .py file (by path) before the command, for what it "
                             "registers: a pattern class or a named Custom(...) is then a spec that --cases, "
                             "model.pattern and show-pattern accept (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "no_malloc_tuning", False):
        tune_malloc()
    try:
        for name in args.imports:
            import_user(name)
        return args.run(args, extra)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"sparse-transformer: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"sparse-transformer: error: {e}", file=sys.stderr)
        return 3
    except Stopped as e:
        print(f"sparse-transformer: {e}", file=sys.stderr)
        return e.code
    except DistributedFailure as e:
        print(f"sparse-transformer: error: {e}; the last checkpoint on disk is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparse-transformer: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"sparse-transformer: error: no space left on the device{where}; every file is written atomically, "
              "so what was there before is intact; free some space and run it again (a run continues with --resume)", file=sys.stderr)
        return 2


def import_user(name: str) -> None:
    """Import a module by name, or a .py file by path, for the patterns it registers; any failure is
    one line (a UsageError)."""
    try:
        if name.endswith(".py") or "/" in name:
            path = Path(name)
            if not path.is_file():
                raise UsageError(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module: say what failed, in one line
        raise UsageError(f"--import {name}: {type(e).__name__}: {e} (python -c 'import ...' shows the traceback)") from None
