"""The learner's machinery: the stop-controller state and the PPO trainer."""
