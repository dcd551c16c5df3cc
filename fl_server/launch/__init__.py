"""Launching and stopping the processes of a federation, by job.

- :mod:`~fl_server.launch.process`: spawn in a session of its own, wait until ready, stop a
  process tree, the ``/proc`` scan, serve in the foreground.
- :mod:`~fl_server.launch.flower_config`: the TOML Flower reads (CLI connections, node and run
  configs, ``k=v`` options), written with ``tomli_w``.
- :mod:`~fl_server.launch.flower`: the SuperLink and SuperNode launchers of a deployment.
- :mod:`~fl_server.launch.warm_clientapp` and :mod:`~fl_server.launch.clientapp_shim`: a
  SuperNode's warm ClientApp launcher and the ``flwr-clientapp`` that hands launches to it.
- :mod:`~fl_server.launch.mlflow_server`: the operator's MLflow tracking server.
- :mod:`~fl_server.launch.flwr_run`: ``flwr run --stream`` for simulation and deployment.
- :mod:`~fl_server.launch.simulation`: a SuperLink in simulation mode (Ray) on loopback.

Nothing is imported here: the ``flwr-clientapp`` shim imports this package for every message.
"""
