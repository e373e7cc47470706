// A shared object that is no plugin: it lacks the entry point, and the worker must say so.
extern "C" int not_a_plugin() { return 0; }
