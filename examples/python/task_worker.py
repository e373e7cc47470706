"""The seed's task_worker.py, ported to taskmaster.

The seed connected to the master's BaseManager, took numbers from its task queue, and put
'n*n=r' on its result queue. Here a Worker takes `square` tasks from a taskmaster master (its
address and a work token from TASKMASTER_ADDR and TASKMASTER_TOKEN) on a pool of processes, so
the work is not serialised by the GIL; it sends results back until told to stop (SIGTERM or
Ctrl-C), and then finishes what it holds before it exits.

    seed                                          taskmaster
    m = QueueManager(address=(server_addr, 5000), worker = Worker()
                     authkey=b'abc')
    m.connect()
    n = task.get(timeout=1)                       @worker.handler('square', pool='process')
                                                  def square(payload):
    r = '%d*%d=%d' % (n, n, n*n)                      return '%d*%d=%d' % (n, n, n*n)
    result.put(r)
"""

from taskmaster import Worker

worker = Worker()


@worker.handler('square', pool='process')
def square(payload):
    n = int(payload)
    # One write per line: the pool's processes share stdout.
    print('run task %d * %d...\n' % (n, n), end='', flush=True)
    return '%d*%d=%d' % (n, n, n * n)


if __name__ == '__main__':
    worker.run()
    print('worker exit')
