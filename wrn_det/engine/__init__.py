"""Pieces shared by the classification and detection engines.

Config loading, checkpoints, distributed launch and communication, logging and
metrics, learning-rate schedules, seeding and user-facing errors. Nothing here
knows about a particular network or task.
"""
