"""Deployment: a trained policy behind one Predictor contract, driven at a fixed control rate.

    contract.py      the Predictor protocol (executable horizon, seeded noise, n_samples) and
                     the finiteness checks every path applies
    protocol.py      the policy server's wire format (JSON header + raw buffers)
    graph.py         the one-step policy as a pure function of (obs, noise): ONNX and compile
    predictors.py    LocalPredictor / OnnxPredictor / PolicyClient
    server.py        PolicyServer, `drifting-policy serve`
    export.py        ONNX export, `drifting-policy export`
    control_loop.py  the real-time loop (Robot protocol, threaded inference, action queue)
    robot.py         GymRobot: a gymnasium env as a Robot
    run.py           `drifting-policy run`

Imports go one way (tests/test_import_graph.py): contract <- protocol <- predictors <- server;
graph <- predictors <- export; contract <- control_loop <- run; predictors, robot <- run. Nothing
here is imported by the policy, data or rollout code.
"""
