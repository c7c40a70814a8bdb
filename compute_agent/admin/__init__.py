"""The admin socket: a local UNIX socket through which compute-agent-manage talks to the agent.

``protocol`` is the framing both sides share, ``server`` the agent's side
(a service component) and ``client`` the CLI's side. The client imports
neither the server nor the manager, so the CLI stays light.
"""
