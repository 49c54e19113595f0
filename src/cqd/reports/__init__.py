

def write_report(cells, grid, out):
    """A grid's table, written by its task's report module (`Task.report`): (markdown, summary)."""
    import importlib

    from cqd.tasks import TASKS

    return importlib.import_module(TASKS.get(grid.base.task).report).write_report(cells, grid, out)
