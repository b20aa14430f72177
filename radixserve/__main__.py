"""`python -m radixserve [flags]`: the OpenAI-compatible server, or with --shell a terminal chat."""
from __future__ import annotations

from radixserve.args import parse_args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.shell:
        from radixserve.shell import run_shell
        run_shell(args)
    else:
        from radixserve.server.launch import launch_server
        launch_server(args)


if __name__ == "__main__":
    main()
