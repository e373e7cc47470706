"""The seed's task_master.py, ported to taskmaster.

The seed started a BaseManager sharing a task queue and a result queue on a port with an
authkey. Here a taskmaster master already serves them, durably: its address and a submit token
come from TASKMASTER_ADDR and TASKMASTER_TOKEN. Side by side with the seed:

    seed                                          taskmaster
    manager = QueueManager(address=('', 5000),    client = Client()
                           authkey=b'abc')
    manager.start()
    task = manager.get_task_queue()               job = client.submit('square', tasks())
    task.put(n)                                   yield str(n)
    r = result.get(timeout=10)                    for r in job.results(timeout=10):
    manager.shutdown()                            client.close()
"""

import random

from taskmaster import Client

client = Client()


def tasks():
    # Put ten tasks; they go to the master as one job, stored before submit returns.
    for i in range(10):
        n = random.randint(0, 10000)
        print('Put task %d...' % n)
        yield str(n)


job = client.submit('square', tasks())
# Read the results, as they complete:
print('Try get result...')
for r in job.results(timeout=10):
    print('Result: %s' % r.text)
client.close()
print('master exit.')
