"""RL maths: advantage estimators, PPO-clip loss and step, online accuracy filter."""
