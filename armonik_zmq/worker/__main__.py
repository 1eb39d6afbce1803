"""``python -m armonik_zmq.worker``: one worker process (the agent starts these)."""

import click

from .runtime import main


@click.command(help="Run one worker process connected to its agent (normally started by `armonik-zmq agent`).")
@click.option("--agent", "agent_endpoint", required=True, help="The agent's worker endpoint (ipc://...).")
@click.option("--processor", required=True, help="The task processor, as MODULE:FUNCTION.")
@click.option("--identity", default="", help="Prefix of this worker's socket identity.")
@click.option("--state", "state_path", default="", help="Run-state file the agent made for this worker (the token of "
              "the task running, read by the agent if the worker dies).")
def cli(agent_endpoint: str, processor: str, identity: str, state_path: str) -> None:
    main(agent_endpoint, processor, identity, state_path)


if __name__ == "__main__":
    cli()
