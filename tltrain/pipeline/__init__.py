"""`tltrain pipeline`: from downloaded datasets to a published intermediate-domain checkpoint as one DAG of jobs
(config: tltrain.pipeline.config, stages: .stages, jobs: .tasks, driver: .run, DAG view: .dag, package: .publish)."""
