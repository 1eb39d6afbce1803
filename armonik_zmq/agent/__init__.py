"""The agent: receives tasks from the broker, runs them on its worker processes, reports outcomes."""

from .agent import Agent

__all__ = ["Agent"]
