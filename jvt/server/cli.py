"""`python -m jvt serve`: placeholder until the server lands."""


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny")


def run(args) -> int:
    raise SystemExit("jvt serve is not implemented yet")
