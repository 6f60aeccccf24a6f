"""The ``bam-zoo`` console script (and ``python cli.py``): fit / validate / test / predict, and push.

The training subcommands are :class:`~bam_zoo.training.cli.BamZooCLI` (LightningCLI); ``push`` is a
jsonargparse parser built from :func:`bam_zoo.hub.push`'s signature and docstring, listed beside them in
``--help``. Errors that say how to fix themselves (bam-zoo's, huggingface_hub's, a bad file) are printed as
their message instead of a traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from jsonargparse import ArgumentParser

from bam_zoo.errors import BamZooError
from bam_zoo import hub
from bam_zoo.training.cli import BamZooCLI

__all__ = ["ZooCLI", "main", "push_parser"]

_PUSH_HELP = "Push a .ckpt from `cli.py fit` or an export folder to a Hugging Face Hub repo, as one commit."
_DASHED = {"--repo-id": "--repo_id", "--commit-message": "--commit_message"}  # the spellings documented before


def push_parser() -> ArgumentParser:
    """``cli.py push``'s options: :func:`bam_zoo.hub.push`'s arguments (the token comes from HF_TOKEN only)."""
    parser = ArgumentParser(prog="cli.py push", description=_PUSH_HELP + " The token comes from HF_TOKEN or "
                            "`hf auth login`; HF_ENDPOINT selects the Hub.")
    parser.add_function_arguments(hub.push, skip={"token"})
    return parser


class ZooCLI(BamZooCLI):
    """:class:`BamZooCLI` whose usage line and ``--help`` list ``push`` too (:func:`main` runs it)."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # jsonargparse keeps the subcommands action LightningCLI created on the parser
            self.parser._subcommands_action.add_subcommand("push", push_parser(), help=_PUSH_HELP)


def _run_push(argv: list[str]) -> None:
    argv = [_DASHED.get(a.split("=")[0], a.split("=")[0]) + a[len(a.split("=")[0]):] for a in argv]
    try:
        print(hub.push(**push_parser().parse_args(argv).as_dict()).commit_url)
    except Exception as error:
        # Bad input and the Hub's answers explain themselves; so does any failure push annotated with the
        # remote's state (a connection error of whichever HTTP library huggingface_hub uses, for one).
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
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from bam_zoo.runtime import keep_freed_memory

    keep_freed_memory()  # CPU steps stop re-faulting their tensors (bam_zoo/runtime.py); BAM_ZOO_MALLOC=default skips
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["push"]:
        return _run_push(argv[1:])
    try:
        ZooCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself, without a warning
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: a preempted job looked finished
        print("bam-zoo: stopped by SIGTERM; the current step is in checkpoints/last.ckpt: rerun the same command "
              "with --ckpt_path last to continue", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except BamZooError as error:
        _exit(error)


def _exit(error: BaseException) -> None:
    kind = "" if isinstance(error, BamZooError) else f"{type(error).__name__}: "
    notes = "".join(f"\n{n}" for n in getattr(error, "__notes__", ()))
    print(f"bam-zoo: error: {kind}{error}{notes}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
    main()
