"""The ``bam-zoo`` console script (and ``python cli.py``): fit / validate / test / predict, and the tools.

Each tool in :data:`TOOLS` is one library function, its parser built from the function's signature and
docstring. Errors that say how to fix themselves are printed as their message instead of a traceback.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.utilities.exceptions import SIGTERMException

from bam_zoo import hub
from bam_zoo.errors import BamZooError
from bam_zoo.explain import explain
from bam_zoo.runtime import keep_freed_memory
from bam_zoo.training.cli import BamZooCLI

__all__ = ["TOOLS", "Tool", "ZooCLI", "main", "tool_parser"]


@dataclass(frozen=True)
class Tool:
    """A subcommand that is one library function: its options are the function's arguments and docstring."""

    function: Callable[..., Any]
    help: str
    skip: frozenset[str] = frozenset()  #: arguments not offered on the command line
    show: Callable[[Any], Any] = str  #: what of the function's result to print
    aliases: dict[str, str] = field(default_factory=dict)  #: option spellings kept from earlier versions


#: the subcommands beside LightningCLI's fit / validate / test / predict
TOOLS: dict[str, Tool] = {
    "push": Tool(hub.push, "Push a .ckpt from `cli.py fit` or an export folder to a Hugging Face Hub repo, as one "
                 "commit. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.",
                 skip=frozenset({"token"}), show=lambda info: info.commit_url,
                 aliases={"--repo-id": "--repo_id", "--commit-message": "--commit_message"}),
    "explain": Tool(explain, "Write PNGs of each BAM's attention on images: where it looks, which channels it boosts."),
    "convert": Tool(hub.convert, "Convert a BAM checkpoint of pytorchcv (osmr/imgclsmob) or of the official code "
                    "(Jongchan/attention-module) into an export folder (Hub layout) for `push`; prints the folder."),
}


def tool_parser(name: str) -> ArgumentParser:
    """The jsonargparse parser of the subcommand ``name`` (a key of :data:`TOOLS`)."""
    tool = TOOLS[name]
    parser = ArgumentParser(prog=f"cli.py {name}", description=tool.help)
    parser.add_function_arguments(tool.function, skip=set(tool.skip))
    return parser


class ZooCLI(BamZooCLI):
    """:class:`BamZooCLI` whose usage line and ``--help`` list the :data:`TOOLS` too (:func:`main` runs them)."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # jsonargparse keeps the subcommands action LightningCLI created on the parser
            for name, tool in TOOLS.items():
                self.parser._subcommands_action.add_subcommand(name, tool_parser(name), help=tool.help)


def _run_tool(name: str, argv: list[str]) -> None:
    tool = TOOLS[name]
    argv = [tool.aliases.get(option, option) + sep + value for option, sep, value in (a.partition("=") for a in argv)]
    try:
        print(tool.show(tool.function(**tool_parser(name).parse_args(argv).as_dict())))
    except Exception as error:
        # Bad input and the Hub's answers explain themselves; so does a failure annotated with the remote's state
        if isinstance(error, (OSError, ValueError, RuntimeError)) or getattr(error, "__notes__", None):
            _exit(error)
        raise

#: exit status after SIGTERM, the shell's convention for "terminated by signal 15"
SIGTERM_EXIT = 128 + signal.SIGTERM


def main(args: list[str] | None = None) -> None:
    """Run the command line; ``args`` replaces ``sys.argv[1:]``.

    Raises:
        SystemExit: 1 after printing an error's message; jsonargparse's status for bad arguments;
            :data:`SIGTERM_EXIT` when SIGTERM stopped training (after ``last.ckpt`` was saved).
    """
    keep_freed_memory()  # CPU steps stop re-faulting their tensors (bam_zoo/runtime.py); BAM_ZOO_MALLOC=default skips
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    try:
        ZooCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself, without a warning
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: a preempted job looked finished
        print("bam-zoo: stopped by SIGTERM; the current step is in checkpoints/last.ckpt: rerun the same command "
              "with --ckpt_path last to continue", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except BamZooError as error:
        _exit(error)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # on success only (a failed rank
        torch.distributed.destroy_process_group()  # must not wait): gloo left to exit can SIGABRT (pytorch#190489)


def _exit(error: BaseException) -> None:
    kind = "" if isinstance(error, BamZooError) else f"{type(error).__name__}: "
    notes = "".join(f"\n{n}" for n in getattr(error, "__notes__", ()))
    print(f"bam-zoo: error: {kind}{error}{notes}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
    main()
