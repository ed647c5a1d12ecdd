"""movierec-spark: a MovieLens recommender as Spark batch jobs writing Delta Lake tables."""

__version__ = "0.1.0"
