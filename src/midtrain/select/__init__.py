"""Selection: proximity estimator (fit), pool scoring with the estimator or a baseline
(score), top-K / sampled selection with a report (select), and export of the mixture."""
