"""Training, evaluation and inference loops around a detkit model.

Import from the submodules (`detkit.engine.evaluator`, `detkit.engine.predictor`, ...): this
package re-exports nothing, so importing one part never pulls in the others.
"""
