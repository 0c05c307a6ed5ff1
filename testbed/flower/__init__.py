"""Run a scenario's federation on Flower (https://flower.ai) instead of in this process.

- `strategy`: the server side, a Flower ``Strategy`` whose aggregation is testbed's
  `finish_round` (screening, aggregator, norm bound, central DP, downlink noise hooks);
- `client_app`: the ``ClientApp`` every (simulated or real) site runs, which calls
  testbed's `client_step` (local training, DP-SGD, adversarial training, clipping hooks);
- `simulation`: the whole run inside Flower's simulation engine (Ray backend);
- `server_app`: the ``ServerApp`` for Flower's deployment engine (SuperLink + SuperNodes).

Needs the ``flower`` extra: ``pip install 'testbed[flower]'``.
"""
