"""Ray Serve deployments of the reward scoring service.

`router.Router` is the HTTP ingress and handle entry point, `scoring.ScoringDeployment` turns attribute
vectors into scalar rewards, and `model.RewardModelDeployment` runs the model. Nothing is imported here so
that importing one deployment never pulls in another's dependencies (the model's torch in particular).
"""
