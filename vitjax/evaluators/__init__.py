"""What evaluation measures: accuracy (classification), cost (parameters,
MACs, speed), what sparse models compute (sparsity), and the written report
(report). vitjax/evaluate.py puts them together for a checkpoint."""
