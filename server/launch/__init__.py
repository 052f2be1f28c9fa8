"""Launchers: the local fleet, the simulation engine, a remote SuperLink (being split out of server/fleet.py)."""

from iiotfl.server.fleet import *  # noqa: F401,F403
