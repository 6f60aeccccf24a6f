"""The ``bam-zoo`` console script (and ``python cli.py``): training subcommands plus ``push``.

``fit`` / ``validate`` / ``test`` / ``predict`` go to the LightningCLI in
:mod:`bam_zoo.training.cli`; ``push`` goes to :func:`bam_zoo.hub.push_main`. bam-zoo's own errors
(missing data, NaN loss, refused checkpoint ...) are printed as their message, which says how to fix
them, instead of a traceback.
"""

from __future__ import annotations

import signal
import sys

#: exit status after SIGTERM, the shell's convention for "terminated by signal 15"
SIGTERM_EXIT = 128 + signal.SIGTERM


def main(args: list[str] | None = None) -> None:
    """Run the command line; ``args`` replaces ``sys.argv[1:]``.

    Raises:
        SystemExit: with ``push``'s return code, 1 after printing a bam-zoo error, or :data:`SIGTERM_EXIT`
            when SIGTERM stopped training (after ``last.ckpt`` was saved at the current step).
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from bam_zoo.errors import BamZooError
    from bam_zoo.runtime import keep_freed_memory

    keep_freed_memory()  # CPU steps stop re-faulting their tensors (bam_zoo/runtime.py); BAM_ZOO_MALLOC=default skips
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "push":
            from bam_zoo.hub import push_main

            raise SystemExit(push_main(argv[1:]))
        from bam_zoo.training.cli import cli_main

        cli_main(None if args is None else argv)  # None: LightningCLI reads sys.argv itself, without a warning
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: a preempted job looked finished
        print("bam-zoo: stopped by SIGTERM; the current step is in checkpoints/last.ckpt: rerun the same command "
              "with --ckpt_path last to continue", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except BamZooError as error:
        print(f"bam-zoo: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
