"""The `abfleet` command line: click commands that parse, call library code and render."""

from __future__ import annotations

import importlib
import sys

import click

from abfleet.buildinfo import version_string
from abfleet.console import error
from abfleet.errors import AbfleetError, Terminated

# Subcommands in the order a user meets them, each imported only when it runs: `abfleet worker
# report` (every dashboard refresh) must not pay for SSH and cloud libraries it never uses.
COMMANDS = {
    "run": "abfleet.cli.run:run_cmd",
    "size": "abfleet.cli.run:size_cmd",
    "report": "abfleet.cli.run:report_cmd",
    "push": "abfleet.cli.run:push_cmd",
    "offers": "abfleet.cli.fleet:offers_cmd",
    "launch": "abfleet.cli.fleet:launch_cmd",
    "create": "abfleet.cli.fleet:create_cmd",
    "setup": "abfleet.cli.fleet:setup_cmd",
    "submit": "abfleet.cli.fleet:submit_cmd",
    "list": "abfleet.cli.fleet:list_cmd",
    "attach-key": "abfleet.cli.fleet:attach_key_cmd",
    "status": "abfleet.cli.monitor:status_cmd",
    "progress": "abfleet.cli.monitor:progress_cmd",
    "logs": "abfleet.cli.monitor:logs_cmd",
    "watch": "abfleet.cli.monitor:watch_cmd",
    "backup": "abfleet.cli.monitor:backup_cmd",
    "download": "abfleet.cli.monitor:download_cmd",
    "resume": "abfleet.cli.monitor:resume_cmd",
    "start": "abfleet.cli.monitor:start_cmd",
    "stop": "abfleet.cli.monitor:stop_cmd",
    "destroy": "abfleet.cli.monitor:destroy_cmd",
    "worker": "abfleet.cli.worker:worker",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(message=version_string(), package_name="abfleet")
@click.option("-v", "--verbose", is_flag=True, help="Show library logs on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """Abliteration jobs here or on rented GPUs (Vast.ai): live progress, verified downloads.

    Start with `abfleet run` (the demo job on this machine); see WORKFLOW.md for cloud runs.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="abfleet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns every KeyboardInterrupt (Terminated included) into Abort.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Terminated):
            error(str(cause))
            sys.exit(cause.exit_code)
        error("aborted")
        sys.exit(130)
    except click.UsageError as exc:
        hint = (
            f" (see abfleet {exc.ctx.command_path.split(' ', 1)[1]} --help)"
            if exc.ctx and " " in exc.ctx.command_path
            else ""
        )
        error(f"{exc.format_message()}{hint}")
        sys.exit(2)
    except click.ClickException as exc:
        error(exc.format_message())
        sys.exit(exc.exit_code)
    except AbfleetError as exc:
        if debug:
            raise
        error(str(exc))
        sys.exit(exc.exit_code)
    except Terminated as exc:
        error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        error(f"unexpected {type(exc).__name__}: {first} (rerun with --debug)")
        sys.exit(1)
