"""worklist package: the radiologists' web page, its database, and the tasks it consumes (worklist/tasks.py)."""

# The module of the worklist's Celery tasks: a worker that runs them imports it (workers.celery_app.configure's
# task_modules; raddraft worker and raddraft serve pass it). A name, so that naming it imports nothing.
TASK_MODULE = "worklist.tasks"
