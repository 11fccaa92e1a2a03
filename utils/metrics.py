"""Continual-learning metrics from the accuracy matrix R[i][j] (task j after learning task i)."""


def summarize(matrix: list[list[float]]) -> dict:
    """Average accuracy after each task, final ACC, backward transfer and forgetting.

    BWT = mean over j < T-1 of R[T-1][j] - R[j][j]; forgetting = mean over j < T-1 of the
    best earlier accuracy on j minus the final one. Both are None after a single task.
    """
    last = len(matrix) - 1
    avg = [sum(row) / len(row) for row in matrix]
    bwt = forgetting = None
    if last > 0:
        bwt = sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last
        forgetting = sum(max(matrix[i][j] for i in range(j, last)) - matrix[last][j]
                         for j in range(last)) / last
    return {"accuracy_matrix": matrix, "avg_accuracy": avg, "final_acc": avg[-1],
            "bwt": bwt, "forgetting": forgetting}
