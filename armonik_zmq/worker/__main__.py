"""``python -m armonik_zmq.worker``: one worker process (the agent starts these)."""

import click

from .runtime import main


@click.command(help="Run one worker process connected to its agent (normally started by `armonik-zmq agent`).")
@click.option("--agent", "agent_path", required=True, help="The agent's worker socket (a Unix socket path); the "
              "worker waits for it while the agent lives.")
@click.option("--processor", required=True, help="The task processor, as MODULE:FUNCTION.")
@click.option("--state", "state_path", default="", help="Run-state file the agent made for this worker (the token of "
              "the task running, read by the agent if the worker dies).")
@click.option("--agent-pid", type=int, default=None, help="The agent's process id: the worker exits at once if "
              "its parent is not (or no longer) that process. Default: the parent at start.")
def cli(agent_path: str, processor: str, state_path: str, agent_pid) -> None:
    main(agent_path, processor, state_path, agent_pid)


if __name__ == "__main__":
    cli()
